"""In-process loopback connector: the test double for the network.

Engines in one process register their KV tensors in a hub; a decode engine copies the
remote blocks straight out of the prefill engine's tensor and tells it the lease can go.
The scheduler side is the shared ``ConnectorScheduler`` (``common.py``).
"""

from __future__ import annotations

import time

import torch
from tandem.kvtransfer.base import (
    FinishedTransfers,
    KVConnectorMetadata,
    KVConnectorWorker,
    TransferRecord,
)
from tandem.kvtransfer.common import KVLayout, TransferState


class LoopbackHub:
    def __init__(self) -> None:
        self.kv_caches: dict[str, torch.Tensor] = {}
        self.states: dict[str, TransferState] = {}

    def register(self, engine_id: str, kv_cache: torch.Tensor, state: TransferState) -> None:
        self.kv_caches[engine_id] = kv_cache
        self.states[engine_id] = state

    def unregister(self, engine_id: str) -> None:
        self.kv_caches.pop(engine_id, None)
        self.states.pop(engine_id, None)


HUB = LoopbackHub()


class LoopbackConnectorWorker(KVConnectorWorker):
    def __init__(
        self, engine_id: str, state: TransferState, model_name: str = "", hub: LoopbackHub = HUB
    ) -> None:
        self.engine_id, self.state, self.hub, self.model_name = engine_id, state, hub, model_name
        self._layout: KVLayout | None = None

    def register_kv_cache(self, kv_cache: torch.Tensor) -> None:
        self._layout = KVLayout.of(self.model_name, kv_cache)
        self.hub.register(self.engine_id, kv_cache, self.state)

    def start_load_kv(self, metadata: KVConnectorMetadata) -> None:
        dst = self.hub.kv_caches[self.engine_id]
        for load in metadata.loads:
            start = time.perf_counter()
            remote_id = load.params.remote_engine_id
            src, src_state = self.hub.kv_caches.get(remote_id), self.hub.states.get(remote_id)
            if src is None or max(load.remote_block_ids, default=-1) >= src.shape[0]:
                error = f"loopback: no engine {remote_id!r} holds those blocks"
                self.state.finish_load(load.request_id, 0, 0.0, error)
                continue
            # Whole blocks: one block is one contiguous region across all layers.
            dst[load.local_block_ids] = src[load.remote_block_ids]
            src_state.lease_taken(load.params.remote_request_id)
            num_bytes = len(load.local_block_ids) * dst[0].nbytes
            self.state.finish_load(load.request_id, num_bytes, time.perf_counter() - start, "")

    def get_finished(self) -> FinishedTransfers:
        return self.state.take_finished()

    @property
    def layout(self) -> dict[str, str | int]:
        return {} if self._layout is None else self._layout.as_dict()

    def drain_transfer_records(self) -> list[TransferRecord]:
        return self.state.drain_records()
