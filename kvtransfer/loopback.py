"""In-process loopback connector: the test double for the network.

Engines in one process register their KV tensors in a hub; a decode engine copies the
remote blocks straight out of the prefill engine's tensor and tells it the lease can go.
"""

from __future__ import annotations

from typing import Any

import torch
from tandem.kvtransfer.base import (
    FinishedTransfers,
    KVConnectorMetadata,
    KVConnectorScheduler,
    KVConnectorWorker,
    KVTransferParams,
    LoadSpec,
)


class LoopbackHub:
    def __init__(self) -> None:
        self.kv_caches: dict[str, torch.Tensor] = {}
        self.sent: dict[str, set[str]] = {}  # engine id -> request ids taken by a peer

    def register(self, engine_id: str, kv_cache: torch.Tensor) -> None:
        self.kv_caches[engine_id] = kv_cache
        self.sent.setdefault(engine_id, set())

    def unregister(self, engine_id: str) -> None:
        self.kv_caches.pop(engine_id, None)
        self.sent.pop(engine_id, None)


HUB = LoopbackHub()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class LoopbackConnectorScheduler(KVConnectorScheduler):
    def __init__(self, engine_id: str, role: str, block_size: int) -> None:
        self.engine_id, self.role, self.block_size = engine_id, role, block_size
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
        first = request.num_computed_tokens // self.block_size
        last = _cdiv(params.num_remote_tokens, self.block_size)
        if last > len(params.remote_block_ids) or last > len(block_ids):
            raise ValueError("kv_transfer_params: fewer blocks than num_remote_tokens needs")
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
        if self.role != "prefill" or request.status.finish_reason != "length":
            return False, None
        params = KVTransferParams(
            self.engine_id, request.request_id, block_ids, request.num_prompt_tokens
        )
        return True, params.to_dict()


class LoopbackConnectorWorker(KVConnectorWorker):
    def __init__(self, engine_id: str, hub: LoopbackHub = HUB) -> None:
        self.engine_id, self.hub = engine_id, hub
        self._received: set[str] = set()
        self._failed: set[str] = set()

    def register_kv_cache(self, kv_cache: torch.Tensor) -> None:
        self.hub.register(self.engine_id, kv_cache)

    def start_load_kv(self, metadata: KVConnectorMetadata) -> None:
        dst = self.hub.kv_caches[self.engine_id]
        for load in metadata.loads:
            src = self.hub.kv_caches.get(load.params.remote_engine_id)
            if src is None or max(load.remote_block_ids, default=-1) >= src.shape[0]:
                self._failed.add(load.request_id)
                continue
            # Whole blocks: one block is one contiguous region across all layers.
            dst[load.local_block_ids] = src[load.remote_block_ids]
            self.hub.sent[load.params.remote_engine_id].add(load.params.remote_request_id)
            self._received.add(load.request_id)

    def get_finished(self) -> FinishedTransfers:
        sent = self.hub.sent.get(self.engine_id, set())
        finished = FinishedTransfers(set(sent), self._received, self._failed)
        sent.clear()
        self._received, self._failed = set(), set()
        return finished
