"""The worker side of the network connectors (UCX, NCCL): the same code, one data plane each.

``register_kv_cache`` starts the data plane and, on a prefill (or colocated) engine, the
block listener, all on the process's transfer thread. ``start_load_kv`` hands each load
to that thread and returns; ``get_finished`` collects what the thread finished.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import logging

import torch
from tandem.kvtransfer.base import (
    FinishedTransfers,
    KVConnectorMetadata,
    KVConnectorWorker,
    TransferRecord,
)
from tandem.kvtransfer.client import BlockLoader
from tandem.kvtransfer.common import KVLayout, TransferState
from tandem.kvtransfer.dataplane import DataPlane
from tandem.kvtransfer.loop import transfer_loop
from tandem.kvtransfer.server import BlockServer

logger = logging.getLogger(__name__)


class RemoteConnectorWorker(KVConnectorWorker):
    def __init__(
        self,
        plane: DataPlane,
        role: str,
        model_name: str,
        state: TransferState,
        host: str = "127.0.0.1",
        port: int = 0,
        timeout: float = 20.0,
    ) -> None:
        self.plane, self.role, self.model_name, self.state = plane, role, model_name, state
        self.host, self.port, self.timeout = host, port, timeout
        self._layout: KVLayout | None = None
        self.server: BlockServer | None = None
        self.loader: BlockLoader | None = None
        self._loads: set[concurrent.futures.Future] = set()

    def register_kv_cache(self, kv_cache: torch.Tensor) -> None:
        # kv_cache: [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]
        self._layout = KVLayout.of(self.model_name, kv_cache)
        self.loop = transfer_loop()
        self.loop.call(self._start(kv_cache))
        # Process groups and UCX endpoints left to interpreter teardown abort noisily.
        atexit.register(self.close)
        logger.info(
            "KV connector %s (%s): listening on %s:%d",
            self.plane.name,
            self.role,
            *self.state.address,
        )

    async def _start(self, kv_cache: torch.Tensor) -> None:
        await self.plane.start(self.host, kv_cache.device)
        self.loader = BlockLoader(self.plane, self._layout, kv_cache, self.state, self.timeout)
        if self.role != "decode":
            self.server = BlockServer(self.plane, self._layout, kv_cache, self.state)
            self.state.address = await self.server.start(self.host, self.port)
        else:
            self.state.address = (self.host, 0)

    def start_load_kv(self, metadata: KVConnectorMetadata) -> None:
        for load in metadata.loads:
            # Held until done: asyncio keeps only weak references to running tasks.
            future = self.loop.submit(self.loader.load(load))
            self._loads.add(future)
            future.add_done_callback(self._loads.discard)

    def get_finished(self) -> FinishedTransfers:
        return self.state.take_finished()

    @property
    def address(self) -> tuple[str, int]:
        return self.state.address

    @property
    def layout(self) -> dict[str, str | int]:
        return {} if self._layout is None else self._layout.as_dict()

    def drain_transfer_records(self) -> list[TransferRecord]:
        return self.state.drain_records()

    def close(self) -> None:
        if self.loader is None:
            return
        loader, self.loader = self.loader, None
        try:
            self.loop.call(self._close(loader), timeout=10.0)
        except Exception:  # closing is best effort: the process may be going away
            logger.exception("KV connector %s: close failed", self.plane.name)

    async def _close(self, loader: BlockLoader) -> None:
        if self.server is not None:
            await self.server.close()
        await loader.close()
        await self.plane.close()
