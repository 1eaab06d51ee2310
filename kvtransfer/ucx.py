"""UCX data plane (ucxx): tagged sends between endpoints made from worker addresses.

Measured on a 2-core CPU machine: a UCX listener endpoint with error handling moves large
messages over TCP (about 0.5 GiB/s), while an endpoint created from the peer's worker
address with error handling off takes shared memory, zero-copy (several GiB/s). So the
control channel (``server.py`` / ``client.py``, plain TCP) swaps worker addresses in
HELLO / HELLO_OK and each side makes an endpoint from the other's address: the serving
side sends on its endpoint, the loading side receives on its own, whose in-flight
receives UCX cancels when it is closed. Peer death is noticed on the control connection.
Progress runs in ucxx's blocking mode on the transfer loop (thread polling starves 2 cores).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable

import torch
from tandem.kvtransfer.dataplane import DataPlane, PeerLink, as_bytes

os.environ.setdefault("UCXPY_PROGRESS_MODE", "blocking")
# ucxx sets UCX_MEMTYPE_CACHE, which UCX 1.21 no longer knows; UCX warns about it on stdout.
os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
# Shared-memory rendezvous is one process_vm_readv per CMA segment, one segment per progress
# call: 32 MiB segments instead of 512 KiB cut the event-loop round trips of a large run
# (measured here: the KV bench's UCX/socket ratio went from about 2.1x to about 3.0x).
os.environ.setdefault("UCX_CMA_SEG_SIZE", "32M")

MAX_ADDRESS_BYTES = 64 << 10


def _rearm_after_events(loop: asyncio.AbstractEventLoop) -> None:
    """Make ucxx's blocking progress mode arm the worker again after every event.

    ucxx's ``BlockingMode`` arms the worker once at start; its reader callback progresses
    the worker on an event but never arms it again, and UCX's event fd stays readable
    until it is armed. So after the first transfer the loop woke for that fd on every
    iteration: about 13k epoll_wait calls a second and a whole core, idle, forever. Here
    the reader callback starts ucxx's own arming task again (it progresses the worker until
    ``arm()`` succeeds, once the loop has nothing else to run), so an idle loop sleeps.
    """
    import ucxx
    from ucxx._lib_async import application_context
    from ucxx._lib_async.continuous_ucx_progress import BlockingMode

    ucxx.core._get_ctx().continuous_ucx_progress(loop)  # creates the loop's progress task
    task = application_context.ProgressTasks.get(loop)
    if not isinstance(task, BlockingMode):
        return  # another progress mode: nothing to arm
    fd = task.worker.epoll_file_descriptor

    def on_event() -> None:
        worker = task.worker
        if worker is None:
            return
        worker.progress()
        if task.arm_task is None or task.arm_task.done():
            task.arm_task = loop.create_task(task._arm_worker())

    loop.remove_reader(fd)
    loop.add_reader(fd, on_event)


def _buffer(tensor: torch.Tensor):
    raw = as_bytes(tensor)
    return raw if raw.is_cuda else raw.numpy()  # numpy: the buffer protocol ucxx reads


class UcxLink(PeerLink):
    def __init__(self, endpoint) -> None:
        self.endpoint = endpoint

    async def send(self, tensor: torch.Tensor, tag: int) -> None:
        if self.endpoint is None:
            raise ConnectionError("UCX link closed")
        await self.endpoint.send(_buffer(tensor), tag=tag, force_tag=True)

    async def recv(self, tensor: torch.Tensor, tag: int) -> None:
        if self.endpoint is None:
            raise ConnectionError("UCX link closed")
        await self.endpoint.recv(_buffer(tensor), tag=tag, force_tag=True)

    def close(self) -> None:
        endpoint, self.endpoint = self.endpoint, None
        if endpoint is not None:
            # Cancels the receives still posted on it; a short period, since a dead peer
            # never answers the close and this runs on the shared transfer loop.
            endpoint.abort(period=100_000_000)


class UcxDataPlane(DataPlane):
    name = "ucx"

    def __init__(self, error_handling: bool = False) -> None:
        self.error_handling = error_handling
        self._address: bytes = b""

    async def start(self, host: str, device: torch.device) -> None:
        import ucxx

        if ucxx.core._ctx is None:  # first UCX user in this process: bind it to this loop
            ucxx.init(progress_mode=os.environ["UCXPY_PROGRESS_MODE"])
            _rearm_after_events(asyncio.get_running_loop())
        self._address = bytes(ucxx.get_worker_address())

    def hello_info(self) -> bytes:
        return self._address

    async def _endpoint(self, address: bytes):
        import ucxx

        if not 0 < len(address) <= MAX_ADDRESS_BYTES:
            raise ValueError(f"UCX worker address of {len(address)} bytes")
        worker_address = ucxx.get_ucx_address_from_buffer(address)
        return await ucxx.create_endpoint_from_worker_address(
            worker_address, endpoint_error_handling=self.error_handling
        )

    async def accept(self, hello_info: bytes) -> tuple[bytes, Awaitable[PeerLink]]:
        link = asyncio.get_running_loop().create_future()
        link.set_result(UcxLink(await self._endpoint(hello_info)))
        return self._address, link

    async def connect(self, host: str, reply_info: bytes) -> PeerLink:
        return UcxLink(await self._endpoint(reply_info))
