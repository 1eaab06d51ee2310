"""The data plane: how whole KV blocks move once the control channel has paired two engines.

A backend (``ucx.py``, ``nccl.py``) implements ``DataPlane`` (connect-time setup) and
``PeerLink`` (tagged sends and receives of contiguous tensors between one pair). The
control channel (``server.py``, ``client.py``) is shared by all backends: it carries the
layout handshake and which blocks to move, and it tells the data plane which tags to use.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable

import torch


class PeerLink(ABC):
    """One paired peer. Every tensor handed to it is one contiguous region."""

    @abstractmethod
    async def send(self, tensor: torch.Tensor, tag: int) -> None:
        """Send ``tensor``'s bytes; the peer receives them under the same ``tag``."""

    @abstractmethod
    async def recv(self, tensor: torch.Tensor, tag: int) -> None:
        """Receive exactly ``tensor.nbytes`` bytes into ``tensor`` (a larger message fails)."""

    @abstractmethod
    def close(self) -> None:
        """Cancel what is in flight; no byte lands in a receive buffer after this returns."""


class DataPlane(ABC):
    """One backend's connect-time half; it lives on the transfer loop."""

    name: str

    @abstractmethod
    async def start(self, host: str, device: torch.device) -> None:
        """Prepare this side (once, on the transfer loop, before any pairing); ``host`` is
        the address this engine's listeners bind to, ``device`` its KV cache's."""

    @abstractmethod
    def hello_info(self) -> bytes:
        """What the loading side sends in its HELLO for the serving side to reach it."""

    @abstractmethod
    async def accept(self, hello_info: bytes) -> tuple[bytes, Awaitable[PeerLink]]:
        """Serving side: (the HELLO_OK info, the link once the loader has connected)."""

    @abstractmethod
    async def connect(self, host: str, reply_info: bytes) -> PeerLink:
        """Loading side: the link to the server at ``host`` that sent ``reply_info``."""

    async def close(self) -> None:  # noqa: B027 (optional hook)
        """Release what ``start`` set up."""


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor (numpy and UCX lack bfloat16)."""
    if not tensor.is_contiguous():
        raise ValueError("data plane: tensors must be contiguous regions of the KV cache")
    return tensor.reshape(-1).view(torch.uint8)
