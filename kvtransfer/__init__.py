"""Moving KV blocks between engines: the connector interface and its backends."""

from __future__ import annotations

import importlib
from typing import Any

from tandem.kvtransfer.base import (
    FinishedTransfers,
    KVConnectorMetadata,
    KVConnectorScheduler,
    KVConnectorWorker,
    KVTransferParams,
    TransferRecord,
)
from tandem.kvtransfer.common import ConnectorScheduler, TransferState

# kv_connector name -> the data plane class of a network connector (imported on use).
DATA_PLANES = {
    "ucx": "tandem.kvtransfer.ucx:UcxDataPlane",
    "nccl": "tandem.kvtransfer.nccl:TorchDistDataPlane",
}
CONNECTORS = ("loopback", *DATA_PLANES)


def create_connector(
    kind: str,
    engine_id: str,
    role: str,
    block_size: int,
    transfer_config: Any = None,
    model_name: str = "",
) -> tuple[KVConnectorScheduler, KVConnectorWorker]:
    """Both sides of the connector named ``kind``; they share one ``TransferState``.

    ``transfer_config`` is the engine's ``TransferConfig`` (defaults when None);
    ``model_name`` goes into the layout that peers compare at connect time.
    """
    if transfer_config is None:
        from tandem.engine.config import TransferConfig

        transfer_config = TransferConfig()
    state = TransferState()
    scheduler = ConnectorScheduler(
        engine_id, role, block_size, state, transfer_config.kv_lease_seconds
    )
    if kind == "loopback":
        from tandem.kvtransfer.loopback import LoopbackConnectorWorker

        return scheduler, LoopbackConnectorWorker(engine_id, state, model_name)
    if kind not in DATA_PLANES:
        raise ValueError(f"kv_connector: unknown connector {kind!r} (known: {CONNECTORS})")
    from tandem.kvtransfer.remote import RemoteConnectorWorker

    module, name = DATA_PLANES[kind].split(":")
    plane_cls = getattr(importlib.import_module(module), name)
    timeout = transfer_config.kv_transfer_timeout
    plane = plane_cls(timeout=timeout) if kind == "nccl" else plane_cls()
    worker = RemoteConnectorWorker(
        plane,
        role,
        model_name,
        state,
        host=transfer_config.kv_transfer_host,
        port=transfer_config.kv_transfer_port,
        timeout=timeout,
    )
    return scheduler, worker


__all__ = [
    "CONNECTORS",
    "FinishedTransfers",
    "KVConnectorMetadata",
    "KVConnectorScheduler",
    "KVConnectorWorker",
    "KVTransferParams",
    "TransferRecord",
    "create_connector",
]
