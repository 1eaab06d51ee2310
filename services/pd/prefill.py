"""The prefill service: ``Prefill`` runs a prompt on a prefill-role engine and returns the
first token plus the ``KVTransferParams`` of the blocks it now leases for a decode instance.

A first token that already ends the request (EOS, a stop string, ``max_tokens`` 1, the
context full) comes back as a finished output and its lease is dropped at once: no decode
instance will ask for those blocks. ``Release`` drops a lease the router no longer needs
(its client went away between the two hops). Cancelling a call aborts its engine request.
"""

from __future__ import annotations

from typing import Any

from tandem.engine.outputs import RequestOutput
from tandem.engine.sampling_params import SamplingParams
from tandem.proto import tandem_pb2 as pb
from tandem.proto import tandem_pb2_grpc as pb_grpc
from tandem.services.pd.convert import (
    delta_to_proto,
    kv_params_to_proto,
    prompt_from_proto,
    sampling_params_from_proto,
    unfinished,
)
from tandem.services.pd.instance import RoleServicer


class PrefillServicer(RoleServicer, pb_grpc.PrefillServiceServicer):
    role = "prefill"

    def add_to_server(self, server: Any) -> None:
        pb_grpc.add_PrefillServiceServicer_to_server(self, server)

    async def Prefill(self, request: pb.GenerateRequest, context: Any) -> pb.PrefillResponse:
        async with self.instance.call(context):
            params = sampling_params_from_proto(request.sampling_params)
            if params.n != 1:
                raise ValueError("n: a prefill instance runs one sample per request")
            prompt = prompt_from_proto(request)
            output = await self._first_token(prompt, params, request.request_id)
            kv_params = output.kv_transfer_params
            if kv_params is not None and not self._complete(output, params):
                return pb.PrefillResponse(
                    output=delta_to_proto(unfinished(output)),
                    kv_transfer_params=kv_params_to_proto(kv_params),
                )
            if kv_params is not None:
                await self.async_llm.abort(request.request_id)  # drop the lease
            return pb.PrefillResponse(output=delta_to_proto(output))

    async def Release(self, request: pb.ReleaseRequest, context: Any) -> pb.ReleaseResponse:
        await self.async_llm.abort(request.request_id)
        return pb.ReleaseResponse()

    async def _first_token(
        self, prompt: dict[str, Any], params: SamplingParams, request_id: str
    ) -> RequestOutput:
        """The request's deltas folded into one output (a prefill engine stops after the
        first token, so this is normally the single delta it sends)."""
        merged: RequestOutput | None = None
        async for output in self.async_llm.generate(prompt, params, request_id):
            if merged is None:
                merged = output
                continue
            mine, new = merged.outputs[0], output.outputs[0]
            mine.text += new.text
            mine.token_ids += new.token_ids
            if new.logprobs is not None:
                mine.logprobs = (mine.logprobs or []) + new.logprobs
            mine.finish_reason, mine.stop_reason = new.finish_reason, new.stop_reason
            merged.finished = output.finished
            merged.kv_transfer_params = output.kv_transfer_params or merged.kv_transfer_params
            merged.metrics.update(output.metrics)
        assert merged is not None and merged.finished, "the engine ends every request"
        return merged

    def _complete(self, output: RequestOutput, params: SamplingParams) -> bool:
        """Whether the first token ends the request for the client too (a prefill engine
        reports 'length' after the first token whether or not the client's cap is hit)."""
        sample = output.outputs[0]
        if sample.finish_reason != "length":
            return True
        num_tokens = len(output.prompt_token_ids) + len(sample.token_ids)
        return (
            params.max_tokens is not None and len(sample.token_ids) >= params.max_tokens
        ) or num_tokens >= self.async_llm.info.runtime.max_model_len
