"""``RemoteEngineClient``: the router's ``EngineClient``. One request = a ``Prefill`` call on
the least-loaded prefill instance, then a ``Decode`` stream on the least-loaded decode
instance, whose deltas are what the OpenAI layer sees.

The decode instance detokenizes (it is handed the first token, so its text and stop
strings are exactly what a colocated engine produces) and its first delta carries the
first token too, with its logprobs when asked for (the prefill instance sends them; the
decode instance starts its logprobs and cumulative logprob from them). A request the
decode instance should run alone (short prompt, or one whose answer a split run could
change: several samples, a seeded random sampler) skips the prefill hop. Closing the
stream cancels whichever call is open, which aborts the engine request there; a lease no
decode call took over is released.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from tandem.engine.outputs import CompletionOutput, RequestOutput
from tandem.engine.sampling_params import SamplingParams
from tandem.engine.stats import EngineStats
from tandem.proto import tandem_pb2 as pb
from tandem.services.api_server.engine_client import EngineClient, EngineUnavailableError
from tandem.services.pd.convert import delta_from_proto, generate_request_to_proto
from tandem.services.router.instances import Instance, InstancePool

logger = logging.getLogger("tandem.router")


def runs_alone(prompt: dict[str, Any], params: SamplingParams, min_remote_tokens: int) -> bool:
    """Whether the decode instance should compute this prompt itself.

    A split run hands over exactly one sample, its first token and that token's logprobs:
    several samples need the prompt per sample; a seeded random sampler would start its
    generator afresh on the second instance.
    """
    return (
        len(prompt["prompt_token_ids"]) < min_remote_tokens
        or params.n > 1
        or (params.seed is not None and not params.greedy)
    )


class RemoteEngineClient(EngineClient):
    def __init__(self, pool: InstancePool, tokenizer: Any, min_remote_tokens: int) -> None:
        self.pool = pool
        self.tokenizer = tokenizer
        self.min_remote_tokens = min_remote_tokens
        infos = [i.info for i in pool.instances]
        self.max_model_len = min(info.max_model_len for info in infos)
        self.vocab_size = min(info.vocab_size for info in infos)

    @property
    def dead_error(self) -> BaseException | None:
        if not any(i.healthy for i in self.pool.of_role("decode")):
            return EngineUnavailableError("no decode instance is reachable; see the router log")
        return None

    def get_stats(self) -> EngineStats:
        return self.pool.stats()

    async def generate(
        self, prompt: dict[str, Any], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        message = generate_request_to_proto(request_id, prompt, params)
        with_logprobs = params.logprobs is not None
        decode_request = pb.DecodeRequest(request=message)
        prefill: Instance | None = None
        try:
            if self.pool.of_role("prefill") and not runs_alone(
                prompt, params, self.min_remote_tokens
            ):
                prefill, response = await self._prefill(message)
                if response is not None and response.output.finished:  # no decode hop
                    yield delta_from_proto(response.output, request_id, prompt, with_logprobs)
                    return
                if response is not None:
                    first = response.output.outputs[0]
                    decode_request.output_token_ids.extend(first.token_ids)
                    if with_logprobs:  # the decode side's logprobs start with the first's
                        decode_request.output_logprobs.extend(first.logprobs)
                    decode_request.kv_transfer_params.CopyFrom(response.kv_transfer_params)
            async with contextlib.aclosing(_decode_hop(self.pool, decode_request, prefill)) as hop:
                async for delta in hop:
                    yield delta_from_proto(delta, request_id, prompt, with_logprobs)
        except RemoteFailure as e:
            yield _failed(request_id, prompt, str(e))

    async def _prefill(
        self, message: pb.GenerateRequest
    ) -> tuple[Instance | None, pb.PrefillResponse | None]:
        """(instance, its answer); (None, None) when no prefill instance could take it
        (none is up, or the one picked was unreachable before the request reached it),
        and the decode instance runs the prompt itself. A prefill instance that failed
        or died while running the request raises RemoteFailure instead: the request may
        be what broke it, and sending it on would spread the poison."""
        try:
            prefill = self.pool.pick("prefill")
            response = await _prefill_hop(prefill, message)
        except EngineUnavailableError as e:
            logger.warning("%s; request %s runs on a decode instance alone", e, message.request_id)
            return None, None
        if not response.output.finished and (
            not response.HasField("kv_transfer_params") or not response.output.outputs
        ):
            raise RemoteFailure(f"prefill instance {prefill.address} sent no KV handle")
        return prefill, response


class RemoteFailure(RuntimeError):
    """An instance failed a request it had taken; the message says which and how."""


async def _prefill_hop(prefill: Instance, message: pb.GenerateRequest) -> pb.PrefillResponse:
    prefill.num_in_flight += 1
    try:
        return await prefill.stub.Prefill(message)
    except grpc.aio.AioRpcError as e:
        raise _api_error(prefill, e) from e
    except asyncio.CancelledError:  # the client went away; the lease may exist already
        await _release(prefill, message.request_id)
        raise
    finally:
        prefill.num_in_flight -= 1


async def _decode_hop(
    pool: InstancePool, request: pb.DecodeRequest, prefill: Instance | None
) -> AsyncIterator[pb.RequestDelta]:
    """The decode call's messages; closing this cancels the call. Until its first message
    the prefill lease is this hop's to release if it ends (the decode side confirms
    receipt itself, before its first token)."""
    received = False
    try:
        decode = pool.pick("decode")
        decode.num_in_flight += 1
        call = decode.stub.Decode(request)
        try:
            async for message in call:
                received = True
                yield message
        except grpc.aio.AioRpcError as e:
            if not received:
                raise _api_error(decode, e) from e
            raise RemoteFailure(f"decode instance {decode.address}: {e.details()}") from e
        finally:
            call.cancel()
            decode.num_in_flight -= 1
    finally:
        if not received:
            await _release(prefill, request.request.request_id)


def _api_error(instance: Instance, error: grpc.aio.AioRpcError) -> Exception:
    """ValueError (400) for a refused request, EngineUnavailableError when the instance
    could not take it (unreachable, draining, its engine already dead: the request never
    ran there), RemoteFailure when it failed while running it (lost mid-call included)."""
    where = f"{instance.role} instance {instance.address}"
    code, details = error.code(), error.details() or ""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return ValueError(details)  # the engine's message, naming the field
    if code == grpc.StatusCode.UNAVAILABLE or code == grpc.StatusCode.DEADLINE_EXCEEDED:
        instance.healthy = False  # until a poll finds it serving again
        if code == grpc.StatusCode.UNAVAILABLE and _never_reached(details):
            return EngineUnavailableError(f"{where} is unavailable: {details}")
    return RemoteFailure(f"{where} failed the request: {code.name}: {details}")


def _never_reached(details: str) -> bool:
    """Whether an UNAVAILABLE call never reached the instance's engine: no connection,
    or the instance refused it up front (draining, engine dead before it arrived)."""
    lowered = details.lower()
    return any(
        marker in lowered
        for marker in ("failed to connect", "connection refused", "draining", "was dead")
    )


async def _release(prefill: Instance | None, request_id: str) -> None:
    """Drop a lease no decode call took over (best effort: it expires anyway)."""
    if prefill is None:
        return
    with contextlib.suppress(grpc.aio.AioRpcError):
        await prefill.stub.Release(pb.ReleaseRequest(request_id=request_id), timeout=5)


def _failed(request_id: str, prompt: dict[str, Any], error: str) -> RequestOutput:
    """A last delta saying the request failed mid-stream."""
    sample = CompletionOutput(0, "", [], None, None, finish_reason="abort")
    return RequestOutput(
        request_id,
        prompt.get("prompt"),
        list(prompt["prompt_token_ids"]),
        None,
        [sample],
        True,
        metrics={"error": error},
    )
