"""What every connector shares: the scheduler side, the KV layout, thread-safe transfer state.

The scheduler side is the same for every transport: it decides how many tokens a decode
engine loads, turns allocated blocks into ``LoadSpec``s, and leases a prefill engine's
blocks when a request finishes. The worker sides (loopback, UCX, NCCL) differ only in how
bytes move; they report results through one ``TransferState`` that both sides hold.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from tandem.kvtransfer.base import (
    FinishedTransfers,
    KVConnectorMetadata,
    KVConnectorScheduler,
    KVTransferParams,
    LoadSpec,
    TransferRecord,
)

# How the engine's KV tensor is laid out; both sides of a transfer must agree on it.
KV_LAYOUT = "blocks-major:[num_blocks,num_layers,2,block_size,num_kv_heads,head_dim]"


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class KVLayout:
    """What two engines compare at connect time; field order is the order of the checks."""

    model: str
    dtype: str
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    layout: str = KV_LAYOUT

    @classmethod
    def of(cls, model: str, kv_cache: torch.Tensor) -> KVLayout:
        # kv_cache: [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]
        if kv_cache.dim() != 6 or kv_cache.shape[2] != 2 or not kv_cache.is_contiguous():
            raise ValueError(f"kv_cache: expected a contiguous {KV_LAYOUT}, got {kv_cache.shape}")
        _, num_layers, _, block_size, num_kv_heads, head_dim = kv_cache.shape
        dtype = str(kv_cache.dtype).removeprefix("torch.")
        return cls(model, dtype, block_size, num_layers, num_kv_heads, head_dim)

    def as_dict(self) -> dict[str, str | int]:
        return asdict(self)

    def mismatch(self, other: KVLayout) -> str | None:
        """A message naming the first field that differs, or None when they match."""
        for name, mine in self.as_dict().items():
            theirs = getattr(other, name)
            if mine != theirs:
                return f"KV layout mismatch: {name} is {mine!r} here but {theirs!r} on the peer"
        return None


class LeaseTable:
    """Blocks a prefill engine serves, by request id, until taken or expired (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._leases: dict[str, tuple[list[int], float]] = {}

    def add(self, request_id: str, block_ids: list[int], seconds: float) -> None:
        with self._lock:
            self._leases[request_id] = (list(block_ids), time.monotonic() + seconds)

    def get(self, request_id: str) -> list[int] | None:
        with self._lock:
            entry = self._leases.get(request_id)
            if entry is None:
                return None
            if entry[1] < time.monotonic():
                del self._leases[request_id]
                return None
            return entry[0]

    def remove(self, request_id: str) -> bool:
        with self._lock:
            return self._leases.pop(request_id, None) is not None

    def __len__(self) -> int:
        with self._lock:
            return len(self._leases)


class TransferState:
    """Results a worker side hands to the engine thread, plus loads still in flight."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.leases = LeaseTable()
        self.address: tuple[str, int] = ("", 0)  # the worker's data listener, once bound
        self._inflight: set[str] = set()
        self._orphaned: set[str] = set()  # aborted while loading: blocks wait for the load
        self._sending: set[str] = set()
        self._receiving: set[str] = set()
        self._failed: set[str] = set()
        self._errors: dict[str, str] = {}
        self._records: list[TransferRecord] = []

    def begin_load(self, request_id: str) -> None:
        with self._lock:
            self._inflight.add(request_id)

    def orphan(self, request_id: str) -> bool:
        """The request is gone; True if its load is still running (keep its blocks)."""
        with self._lock:
            if request_id in self._inflight:
                self._orphaned.add(request_id)
                return True
            return False

    def finish_load(self, request_id: str, num_bytes: int, seconds: float, error: str) -> None:
        """A load ended (``error`` empty on success); no byte of it is written after this."""
        with self._lock:
            self._inflight.discard(request_id)
            self._records.append(TransferRecord(request_id, num_bytes, seconds, not error, error))
            if request_id in self._orphaned:  # its blocks sit under a lease: free them now
                self._orphaned.discard(request_id)
                self._sending.add(request_id)
            elif error:
                self._failed.add(request_id)
                self._errors[request_id] = error
            else:
                self._receiving.add(request_id)

    def lease_taken(self, request_id: str) -> None:
        """A peer confirmed it holds this leased request's blocks."""
        if self.leases.remove(request_id):
            with self._lock:
                self._sending.add(request_id)

    def take_finished(self) -> FinishedTransfers:
        with self._lock:
            out = FinishedTransfers(self._sending, self._receiving, self._failed, self._errors)
            self._sending, self._receiving, self._failed, self._errors = set(), set(), set(), {}
        return out

    def drain_records(self) -> list[TransferRecord]:
        with self._lock:
            records, self._records = self._records, []
        return records


class ConnectorScheduler(KVConnectorScheduler):
    """The scheduler side of every connector (see the module docstring)."""

    def __init__(
        self, engine_id: str, role: str, block_size: int, state: TransferState, lease_seconds: float
    ) -> None:
        self.engine_id, self.role, self.block_size = engine_id, role, block_size
        self.state, self.lease_seconds = state, lease_seconds
        self._pending: list[LoadSpec] = []

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> int:
        if self.role != "decode" or request.kv_transfer_params is None:
            return 0
        params = KVTransferParams.from_dict(request.kv_transfer_params)
        return max(0, params.num_remote_tokens - num_computed_tokens)

    def update_state_after_alloc(
        self, request: Any, block_ids: list[int], num_external_tokens: int
    ) -> None:
        if num_external_tokens == 0:
            return
        params = KVTransferParams.from_dict(request.kv_transfer_params)
        # Only whole blocks past the local prefix-cache hit move; the hit ends on a block edge.
        first = request.num_computed_tokens // self.block_size
        last = cdiv(params.num_remote_tokens, self.block_size)
        if last > len(params.remote_block_ids) or last > len(block_ids):
            raise ValueError("kv_transfer_params: fewer blocks than num_remote_tokens needs")
        self.state.begin_load(request.request_id)
        self._pending.append(
            LoadSpec(
                request.request_id,
                params,
                block_ids[first:last],
                params.remote_block_ids[first:last],
            )
        )

    def build_connector_meta(self) -> KVConnectorMetadata:
        loads, self._pending = self._pending, []
        return KVConnectorMetadata(loads)

    def request_finished(
        self, request: Any, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        if self.role == "decode":
            # Aborted while its KV is arriving: the blocks must outlive the load.
            return self.state.orphan(request.request_id), None
        if self.role != "prefill" or request.status.finish_reason != "length":
            return False, None
        host, port = self.state.address
        params = KVTransferParams(
            self.engine_id, request.request_id, block_ids, request.num_prompt_tokens, host, port
        )
        self.state.leases.add(request.request_id, block_ids, self.lease_seconds)
        return True, params.to_dict()

    def lease_released(self, request_id: str) -> None:
        self.state.leases.remove(request_id)
