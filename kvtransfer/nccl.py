"""torch.distributed data plane: point-to-point send/recv in a 2-rank group per peer pair.

``nccl`` process groups when the KV cache is on a GPU, ``gloo`` on CPU, so CI runs the
same path. One process talks to many peers, so nothing touches torch.distributed's global
default group: the serving side hosts one ``TCPStore`` (its socket bound to
kv_transfer_host), every pairing gets a fresh key prefix in it, and the two sides build a
``ProcessGroupGloo``/``ProcessGroupNCCL`` of size 2 on that prefix (server rank 0, loader
rank 1). Blocking ``Work.wait()`` calls run on a small thread pool, never on the loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import struct
import uuid
from collections.abc import Awaitable
from datetime import timedelta

import torch
import torch.distributed as dist
from tandem.kvtransfer.dataplane import DataPlane, PeerLink, as_bytes

TAG_LIMIT = 1 << 31  # c10d tags are non-negative 32-bit ints
_REPLY = struct.Struct("!H32s")  # store port, pair id


class TorchDistLink(PeerLink):
    def __init__(self, group, rank: int, pool: concurrent.futures.Executor, cuda: bool) -> None:
        self.group, self.peer, self.pool, self.cuda = group, 1 - rank, pool, cuda

    async def _wait(self, work) -> None:
        def wait() -> None:
            work.wait()
            if self.cuda:  # the data must be visible to the model's stream
                torch.cuda.current_stream().synchronize()

        await asyncio.get_running_loop().run_in_executor(self.pool, wait)

    async def send(self, tensor: torch.Tensor, tag: int) -> None:
        if self.group is None:
            raise ConnectionError("torch.distributed link closed")
        await self._wait(self.group.send([as_bytes(tensor)], self.peer, tag % TAG_LIMIT))

    async def recv(self, tensor: torch.Tensor, tag: int) -> None:
        if self.group is None:
            raise ConnectionError("torch.distributed link closed")
        await self._wait(self.group.recv([as_bytes(tensor)], self.peer, tag % TAG_LIMIT))

    def close(self) -> None:
        group, self.group = self.group, None
        abort = getattr(group, "abort", None) or getattr(group, "shutdown", None)
        if abort is not None:
            try:
                abort()  # fails the work still pending on this pair
            except RuntimeError:
                pass


class TorchDistDataPlane(DataPlane):
    name = "nccl"

    def __init__(self, timeout: float = 20.0) -> None:
        self.timeout = timedelta(seconds=timeout)
        self.pool = concurrent.futures.ThreadPoolExecutor(16, thread_name_prefix="tandem-kv-dist")
        self._store: dist.TCPStore | None = None

    async def start(self, host: str, device: torch.device) -> None:
        self.host, self.cuda = host, device.type == "cuda"

    def hello_info(self) -> bytes:
        return b""

    def _server_store(self) -> dist.TCPStore:
        if self._store is None:
            # Our own listening socket, so the store binds kv_transfer_host only.
            listen = socket.create_server((self.host, 0))
            port = listen.getsockname()[1]
            self._store = dist.TCPStore(
                self.host, port, None, True, self.timeout,
                wait_for_workers=False, master_listen_fd=listen.detach(),  # the store owns it
            )  # fmt: skip
        return self._store

    def _make_group(self, store: dist.Store, pair_id: str, rank: int):
        prefixed = dist.PrefixStore(f"tandem-kv/{pair_id}/", store)
        if self.cuda:
            return dist.ProcessGroupNCCL(prefixed, rank, 2, dist.ProcessGroupNCCL.Options())
        options = dist.ProcessGroupGloo._Options()
        options._devices = [dist.ProcessGroupGloo.create_device(hostname=self.host)]
        options._timeout = self.timeout
        return dist.ProcessGroupGloo(prefixed, rank, 2, options)

    def _link(self, group, rank: int) -> PeerLink:
        return TorchDistLink(group, rank, self.pool, self.cuda)

    async def accept(self, hello_info: bytes) -> tuple[bytes, Awaitable[PeerLink]]:
        loop = asyncio.get_running_loop()
        store = await loop.run_in_executor(self.pool, self._server_store)
        pair_id = uuid.uuid4().hex
        group = loop.run_in_executor(self.pool, self._make_group, store, pair_id, 0)

        async def link() -> PeerLink:
            return self._link(await group, 0)

        return _REPLY.pack(store.port, pair_id.encode()), link()

    async def connect(self, host: str, reply_info: bytes) -> PeerLink:
        if len(reply_info) != _REPLY.size:
            raise ValueError(f"torch.distributed pairing info of {len(reply_info)} bytes")
        port, pair_id = _REPLY.unpack(reply_info)

        def join():
            store = dist.TCPStore(host, port, None, False, self.timeout)
            return self._make_group(store, pair_id.decode("ascii"), 1)

        group = await asyncio.get_running_loop().run_in_executor(self.pool, join)
        return self._link(group, 1)

    async def close(self) -> None:
        self._store = None
        self.pool.shutdown(wait=False, cancel_futures=True)
