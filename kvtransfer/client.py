"""Decode side of a remote connector: pulls a request's blocks from the prefill listener.

One control connection per prefill address, opened on first use and kept; its reader
task routes READ_ERRORs to the load that asked and, when the connection drops, fails every
load still waiting on it and closes the data link (which cancels posted receives, so no
byte lands in blocks the engine may have handed to another request). A load posts its
receives straight into the destination blocks' views of the KV tensor, sends READ, waits,
then sends DONE so the prefill side can end the lease.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time

import torch
from tandem.kvtransfer.base import LoadSpec
from tandem.kvtransfer.common import KVLayout, TransferState
from tandem.kvtransfer.dataplane import DataPlane, PeerLink
from tandem.kvtransfer.wire import (
    Done,
    Hello,
    MsgType,
    Read,
    ReadError,
    Refuse,
    WireError,
    block_runs,
    encode,
    read_message,
)

logger = logging.getLogger(__name__)

# Tags are unique per process: several engines of one process share one UCX worker.
_tags = itertools.count(1)
_transfer_ids = itertools.count(1)


class TransferError(RuntimeError):
    """A load failed; the message says why (it reaches the user under policy 'fail')."""


class _Peer:
    """One prefill instance: its control connection, data link and loads in flight."""

    def __init__(self, address: str, reader, writer, link: PeerLink) -> None:
        self.address, self.reader, self.writer, self.link = address, reader, writer, link
        self.pending: dict[int, asyncio.Future[str]] = {}  # transfer id -> error, when one comes
        self.broken: str | None = None
        self.reader_task: asyncio.Task | None = None

    def send(self, msg: Read | Done) -> None:
        if self.broken is not None:
            raise TransferError(f"connection to {self.address} lost: {self.broken}")
        self.writer.write(encode(msg))

    def fail(self, reason: str) -> None:
        if self.broken is not None:
            return
        self.broken = reason
        self.link.close()
        self.writer.close()
        for future in self.pending.values():
            if not future.done():
                future.set_result(f"connection to {self.address} lost: {reason}")


class BlockLoader:
    def __init__(
        self,
        plane: DataPlane,
        layout: KVLayout,
        kv_cache: torch.Tensor,
        state: TransferState,
        timeout: float,
    ) -> None:
        self.plane, self.layout, self.kv_cache, self.state = plane, layout, kv_cache, state
        self.timeout = timeout
        self._peers: dict[tuple[str, int], asyncio.Task[_Peer]] = {}

    async def load(self, spec: LoadSpec) -> None:
        """Move one request's blocks; always ends in ``state.finish_load``."""
        start, num_bytes, error = time.perf_counter(), 0, ""
        try:
            num_bytes = await self._load(spec)
        except Exception as e:
            error = str(e) or repr(e)
            logger.warning("KV load of %s failed: %s", spec.request_id, error)
        self.state.finish_load(
            spec.request_id, 0 if error else num_bytes, time.perf_counter() - start, error
        )

    async def _load(self, spec: LoadSpec) -> int:
        params = spec.params
        runs = block_runs(spec.remote_block_ids, spec.local_block_ids)
        num_blocks = self.kv_cache.shape[0]
        if any(dst < 0 or dst + n > num_blocks for _, dst, n in runs):
            raise TransferError(f"destination blocks outside the {num_blocks} KV blocks")
        if not runs:
            return 0
        if not params.remote_port:
            raise TransferError("kv_transfer_params: no remote_port (prefill has no listener)")
        peer = await self._peer(params.remote_host, params.remote_port)
        transfer_id, tag = next(_transfer_ids), next(_tags)
        for _ in range(len(runs) - 1):
            next(_tags)
        # views: kv_cache[dst:dst + n], each one contiguous region of n whole blocks
        views = [self.kv_cache[dst : dst + n] for _, dst, n in runs]
        error = asyncio.get_running_loop().create_future()
        peer.pending[transfer_id] = error
        try:
            recvs = [asyncio.ensure_future(peer.link.recv(v, tag + i)) for i, v in enumerate(views)]
            await asyncio.sleep(0)  # the receives are posted before the READ goes out
            wire_runs = [(src, n) for src, _, n in runs]
            peer.send(Read(transfer_id, tag, params.remote_request_id, wire_runs))
            received = asyncio.gather(*recvs)
            await asyncio.wait(
                [received, error], timeout=self.timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if received.done() and not received.cancelled() and received.exception() is None:
                try:
                    peer.send(Done(transfer_id, params.remote_request_id))
                except TransferError:
                    pass  # the blocks are here; the prefill lease expires instead
                return sum(v.nbytes for v in views)
            if error.done():  # READ_ERROR (nothing was sent) or the connection dropped
                received.cancel()
                raise TransferError(f"prefill instance {peer.address}: {error.result()}")
            if received.done():
                received.result()  # raises the data plane's error
            peer.fail(f"no data within {self.timeout}s")
            raise TransferError(f"loading from {peer.address} timed out after {self.timeout}s")
        except BaseException:
            if not error.done() and peer.broken is None:
                peer.fail("a receive failed")  # cancels what may still be posted
            raise
        finally:
            peer.pending.pop(transfer_id, None)

    async def _peer(self, host: str, port: int) -> _Peer:
        key = (host, port)
        task = self._peers.get(key)
        if task is not None and task.done():
            if task.cancelled() or task.exception() is not None or task.result().broken:
                task = None
        if task is None:
            task = self._peers[key] = asyncio.ensure_future(self._connect(host, port))
        try:
            return await asyncio.shield(task)
        except Exception:
            if self._peers.get(key) is task:
                del self._peers[key]  # not cached: the next load tries again
            raise

    async def _connect(self, host: str, port: int) -> _Peer:
        address = f"{host}:{port}"
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port), self.timeout
            )
        except (OSError, asyncio.TimeoutError) as e:
            raise TransferError(f"cannot reach the prefill instance at {address}: {e!r}") from e
        try:
            writer.write(encode(Hello(self.layout, self.plane.hello_info())))
            kind, msg = await asyncio.wait_for(read_message(reader), self.timeout)
            if isinstance(msg, Refuse):
                raise TransferError(f"prefill instance {address} refused: {msg.reason}")
            if kind is not MsgType.HELLO_OK:
                raise WireError(f"expected HELLO_OK, got {kind.name}")
            assert isinstance(msg, Hello)
            problem = self.layout.mismatch(msg.layout)
            if problem is not None:
                raise TransferError(f"prefill instance {address}: {problem}")
            link = await asyncio.wait_for(self.plane.connect(host, msg.info), self.timeout)
        except BaseException as e:
            writer.close()
            if isinstance(e, TransferError):
                logger.error("KV connect: %s", e)
            handshake_errors = (WireError, asyncio.IncompleteReadError, asyncio.TimeoutError)
            if isinstance(e, (*handshake_errors, ConnectionError)):
                raise TransferError(f"handshake with {address} failed: {e!r}") from e
            raise
        peer = _Peer(address, reader, writer, link)
        peer.reader_task = asyncio.ensure_future(self._read_loop(peer))  # held: see remote.py
        return peer

    async def _read_loop(self, peer: _Peer) -> None:
        reason = "closed by the prefill instance"
        try:
            while True:
                kind, msg = await read_message(peer.reader)
                if isinstance(msg, ReadError):
                    future = peer.pending.get(msg.transfer_id)
                    if future is not None and not future.done():
                        future.set_result(msg.reason)
                elif isinstance(msg, Refuse):
                    reason = f"refused: {msg.reason}"
                    break
                else:
                    raise WireError(f"unexpected {kind.name} from a prefill instance")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except Exception as e:
            reason = repr(e)
        peer.fail(reason)

    async def close(self) -> None:
        for task in self._peers.values():
            if task.done() and not task.cancelled() and task.exception() is None:
                task.result().fail("connector closed")
            else:
                task.cancel()
