"""The KV connector interface, split by side as the design says.

Scheduler side (in the engine's scheduler): how many tokens of a request can be loaded
from elsewhere, what to load once blocks are allocated, and whether a finished request's
blocks must outlive it (a prefill engine leases them until the decode side has them).
Worker side (beside the model runner, owning the KV tensor): start loads, report which
loads and sends have finished.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch


@dataclass(frozen=True)
class KVTransferParams:
    """Where a decode engine finds a request's prompt KV; travels as a plain dict."""

    remote_engine_id: str
    remote_request_id: str
    remote_block_ids: list[int]
    num_remote_tokens: int
    remote_host: str = ""  # the prefill connector's data listener ("" in-process)
    remote_port: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "remote_engine_id": self.remote_engine_id,
            "remote_request_id": self.remote_request_id,
            "remote_block_ids": list(self.remote_block_ids),
            "num_remote_tokens": self.num_remote_tokens,
            "remote_host": self.remote_host,
            "remote_port": self.remote_port,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KVTransferParams:
        try:
            params = cls(
                remote_engine_id=str(data["remote_engine_id"]),
                remote_request_id=str(data["remote_request_id"]),
                remote_block_ids=[int(b) for b in data["remote_block_ids"]],
                num_remote_tokens=int(data["num_remote_tokens"]),
                remote_host=str(data.get("remote_host", "")),
                remote_port=int(data.get("remote_port", 0)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"kv_transfer_params: malformed ({e!r})") from e
        if params.num_remote_tokens < 0 or any(b < 0 for b in params.remote_block_ids):
            raise ValueError("kv_transfer_params: negative token count or block id")
        if not 0 <= params.remote_port < 65536:
            raise ValueError(f"kv_transfer_params: remote_port {params.remote_port} out of range")
        return params


@dataclass(frozen=True)
class LoadSpec:
    request_id: str
    params: KVTransferParams
    local_block_ids: list[int]  # destination blocks, in order
    remote_block_ids: list[int]  # source blocks, same length


@dataclass
class KVConnectorMetadata:
    """What the scheduler tells the worker side this step."""

    loads: list[LoadSpec] = field(default_factory=list)


class FinishedTransfers(NamedTuple):
    sending: set[str]  # leased requests whose blocks the remote side has taken
    receiving: set[str]  # requests whose KV has fully arrived
    failed: set[str]  # requests whose load failed
    errors: dict[str, str] | None = None  # failed request id -> why, for the user


class TransferRecord(NamedTuple):
    """One finished load on the decode side (the services' transfer metrics)."""

    request_id: str
    num_bytes: int
    seconds: float
    ok: bool
    error: str = ""


class KVConnectorScheduler(ABC):
    @abstractmethod
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> int:
        """Tokens beyond ``num_computed_tokens`` whose KV can be loaded from elsewhere."""

    @abstractmethod
    def update_state_after_alloc(
        self, request: Any, block_ids: list[int], num_external_tokens: int
    ) -> None:
        """Blocks are allocated; remember to load ``num_external_tokens`` into them."""

    @abstractmethod
    def build_connector_meta(self) -> KVConnectorMetadata:
        """The loads to start this step (and forget them here)."""

    @abstractmethod
    def request_finished(
        self, request: Any, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        """(keep the blocks until the transfer confirms, kv_transfer_params for the output).

        Keeping puts the blocks under a lease that ends when the worker side reports the
        request in ``FinishedTransfers.sending`` or when ``kv_lease_seconds`` pass.
        """

    def lease_released(self, request_id: str) -> None:  # noqa: B027 (optional hook)
        """The scheduler dropped a lease (expired or aborted): stop serving its blocks."""


class KVConnectorWorker(ABC):
    @abstractmethod
    def register_kv_cache(self, kv_cache: torch.Tensor) -> None:
        """The engine's KV tensor: [num_blocks, ...], one contiguous region per block."""

    @abstractmethod
    def start_load_kv(self, metadata: KVConnectorMetadata) -> None:
        """Begin the loads; must not wait for them."""

    @abstractmethod
    def get_finished(self) -> FinishedTransfers:
        """Transfers that completed (or failed) since the last call."""

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) of this side's data listener; port 0 when it has none."""
        return ("", 0)

    @property
    def layout(self) -> dict[str, str | int]:
        """Model, dtype and KV-cache geometry that a peer must match."""
        return {}

    def drain_transfer_records(self) -> list[TransferRecord]:
        """Finished loads since the last call (thread-safe)."""
        return []

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Stop listeners and drop connections; the engine is going away."""
