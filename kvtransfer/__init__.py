"""Moving KV blocks between engines: the connector interface and its backends."""

from __future__ import annotations

from tandem.kvtransfer.base import (
    FinishedTransfers,
    KVConnectorMetadata,
    KVConnectorScheduler,
    KVConnectorWorker,
    KVTransferParams,
)


def create_connector(
    kind: str, engine_id: str, role: str, block_size: int
) -> tuple[KVConnectorScheduler, KVConnectorWorker]:
    """Both sides of the connector named ``kind``."""
    if kind == "loopback":
        from tandem.kvtransfer.loopback import LoopbackConnectorScheduler, LoopbackConnectorWorker

        return (
            LoopbackConnectorScheduler(engine_id, role, block_size),
            LoopbackConnectorWorker(engine_id),
        )
    raise ValueError(f"kv_connector: unknown connector {kind!r} (known: 'loopback')")


__all__ = [
    "FinishedTransfers",
    "KVConnectorMetadata",
    "KVConnectorScheduler",
    "KVConnectorWorker",
    "KVTransferParams",
    "create_connector",
]
