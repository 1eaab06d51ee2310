"""The decode service: ``Decode`` continues a request from the prefill instance's first
token (with its logprobs, when asked for) and ``KVTransferParams`` (or, without them, runs
the prompt itself) and streams its deltas: text (detokenized and cut at stop strings here,
as colocated), token ids, logprobs, finish reason and, once, how long loading its KV took
and how many bytes moved.

Cancelling the call aborts the engine request, which frees its blocks.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from typing import Any

from tandem.proto import tandem_pb2 as pb
from tandem.proto import tandem_pb2_grpc as pb_grpc
from tandem.services.pd.convert import (
    delta_to_proto,
    kv_params_from_proto,
    logprobs_from_proto,
    prompt_from_proto,
    sampling_params_from_proto,
)
from tandem.services.pd.instance import RoleServicer

# Records of loads whose request never asks for them (aborted while its KV arrived) are
# kept at most this many, oldest dropped first.
_MAX_UNCLAIMED_RECORDS = 4096


class TransferLedger:
    """The connector's per-request transfer records, kept until the request's stream
    claims its own; running totals for InstanceInfo."""

    def __init__(self, drain: Callable[[], list[Any]]) -> None:
        self._drain = drain
        self._records: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.num_bytes_total = 0
        self.seconds_total = 0.0

    def take(self, request_id: str) -> pb.KVTransferStats | None:
        """This request's load, once it has finished; None before (or without a load)."""
        with self._lock:
            for record in self._drain():
                self._records[record.request_id] = record
                if record.ok:
                    self.num_bytes_total += record.num_bytes
                    self.seconds_total += record.seconds
            while len(self._records) > _MAX_UNCLAIMED_RECORDS:
                self._records.popitem(last=False)
            record = self._records.pop(request_id, None)
        if record is None:
            return None
        return pb.KVTransferStats(num_bytes=record.num_bytes, seconds=record.seconds, ok=record.ok)


class DecodeServicer(RoleServicer, pb_grpc.DecodeServiceServicer):
    role = "decode"

    def __init__(self, async_llm: Any) -> None:
        super().__init__(async_llm)
        self.ledger = TransferLedger(async_llm.drain_transfer_records)

    def add_to_server(self, server: Any) -> None:
        pb_grpc.add_DecodeServiceServicer_to_server(self, server)

    def transfer_totals(self) -> tuple[int, float]:
        self.ledger.take("")  # fold new records into the totals
        return self.ledger.num_bytes_total, self.ledger.seconds_total

    async def Decode(
        self, request: pb.DecodeRequest, context: Any
    ) -> AsyncIterator[pb.RequestDelta]:
        async with self.instance.call(context):
            inner = request.request
            params = sampling_params_from_proto(inner.sampling_params)
            kwargs: dict[str, Any] = {}
            if request.output_token_ids:
                kwargs["output_token_ids"] = list(request.output_token_ids)
            if request.output_logprobs:  # the engine checks them against the tokens
                kwargs["output_logprobs"] = logprobs_from_proto(request.output_logprobs)
            if request.HasField("kv_transfer_params"):
                kwargs["kv_transfer_params"] = kv_params_from_proto(request.kv_transfer_params)
            stream = self.async_llm.generate(
                prompt_from_proto(inner), params, inner.request_id, **kwargs
            )
            awaiting_stats = "kv_transfer_params" in kwargs
            async for output in stream:  # leaving early (cancelled) aborts the request
                message = delta_to_proto(output)
                if awaiting_stats:
                    stats = self.ledger.take(inner.request_id)
                    if stats is not None:
                        message.kv_transfer.CopyFrom(stats)
                        awaiting_stats = False
                yield message
