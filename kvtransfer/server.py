"""Prefill side of a remote connector: the data listener that serves leased blocks.

A loader connects to (kv_transfer_host, kv_transfer_port), the two sides compare KV
layouts (HELLO / HELLO_OK, or REFUSE naming the field that differs), the data plane pairs
them, and then each READ names a leased request and runs of its blocks, which go out as
one data-plane message per run. DONE from the loader ends the lease. Every READ is
checked against the lease and the KV tensor before a byte is sent; a connection that
sends anything malformed is dropped, and the listener keeps serving the others.
"""

from __future__ import annotations

import asyncio
import logging

import torch
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
    encode,
    read_message,
)

logger = logging.getLogger(__name__)

HANDSHAKE_SECONDS = 10.0


class BlockServer:
    def __init__(
        self, plane: DataPlane, layout: KVLayout, kv_cache: torch.Tensor, state: TransferState
    ) -> None:
        self.plane, self.layout, self.kv_cache, self.state = plane, layout, kv_cache, state
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task] = set()

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen on ``host:port`` (0: any free port); returns the bound address."""
        self._server = await asyncio.start_server(self._serve, host, port)
        bound = self._server.sockets[0].getsockname()
        return bound[0], bound[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._connections.add(task)
        peer = writer.get_extra_info("peername")
        link: PeerLink | None = None
        reads: set[asyncio.Task] = set()
        try:
            link = await self._handshake(reader, writer)
            if link is None:
                return
            while True:
                kind, msg = await read_message(reader)
                if kind is MsgType.READ:
                    read = asyncio.create_task(self._serve_read(link, msg, writer))
                    reads.add(read)
                    read.add_done_callback(reads.discard)
                elif kind is MsgType.DONE:
                    assert isinstance(msg, Done)
                    self.state.lease_taken(msg.request_id)
                else:
                    raise WireError(f"unexpected {kind.name} from a loader")
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # the loader hung up (or the engine is closing)
        except (WireError, asyncio.TimeoutError) as e:
            logger.warning("KV listener: dropping connection from %s: %s", peer, e)
            await _send_quietly(writer, Refuse(f"protocol error: {e}"))
        except Exception:
            logger.exception("KV listener: connection from %s failed", peer)
        finally:
            for read in reads:
                read.cancel()
            if link is not None:
                link.close()
            writer.close()
            self._connections.discard(task)

    async def _handshake(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> PeerLink | None:
        kind, msg = await asyncio.wait_for(read_message(reader), HANDSHAKE_SECONDS)
        if kind is not MsgType.HELLO:
            raise WireError(f"expected HELLO, got {kind.name}")
        assert isinstance(msg, Hello)
        problem = self.layout.mismatch(msg.layout)
        if problem is not None:
            logger.warning("KV listener: refusing a loader: %s", problem)
            await _send_quietly(writer, Refuse(problem))
            return None
        reply, pending = await self.plane.accept(msg.info)
        writer.write(encode(Hello(self.layout, reply), MsgType.HELLO_OK))
        await writer.drain()
        return await asyncio.wait_for(pending, HANDSHAKE_SECONDS)

    def check_read(self, msg: Read) -> str | None:
        """Why this READ cannot be served, or None."""
        lease = self.state.leases.get(msg.request_id)
        if lease is None:
            return f"request {msg.request_id!r} holds no lease here (unknown or expired)"
        leased, num_blocks, total = set(lease), self.kv_cache.shape[0], 0
        for start, count in msg.runs:
            if count < 1 or start + count > num_blocks:
                return f"block run ({start}, {count}) outside the {num_blocks} KV blocks"
            if not leased.issuperset(range(start, start + count)):
                return f"block run ({start}, {count}) is not leased to {msg.request_id!r}"
            total += count
        if total > len(lease):
            return f"READ asks for {total} blocks; the lease holds {len(lease)}"
        if msg.tag + len(msg.runs) >= 1 << 63:
            return f"tag {msg.tag} out of range"
        return None

    async def _serve_read(self, link: PeerLink, msg: Read, writer: asyncio.StreamWriter) -> None:
        problem = self.check_read(msg)
        if problem is not None:
            # Nothing was sent for this READ, so the loader can drop it alone.
            await _send_quietly(writer, ReadError(msg.transfer_id, problem))
            return
        try:
            # One message per run: kv_cache[start:start + count] is one contiguous region.
            await asyncio.gather(
                *(
                    link.send(self.kv_cache[start : start + count], msg.tag + i)
                    for i, (start, count) in enumerate(msg.runs)
                )
            )
        except Exception as e:  # the data plane broke: drop the whole connection
            logger.warning("KV listener: sending %s failed: %r", msg.request_id, e)
            writer.close()


async def _send_quietly(writer: asyncio.StreamWriter, msg: Refuse | ReadError) -> None:
    try:
        writer.write(encode(msg))
        await writer.drain()
    except (ConnectionError, RuntimeError):
        pass
