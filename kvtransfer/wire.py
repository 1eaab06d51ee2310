"""The KV wire's control messages: a fixed binary header, then struct-packed fields.

Header (12 bytes, network order): magic ``b"TKV1"``, version (u8), message type (u8),
reserved (u16, zero), payload length (u32, at most ``MAX_PAYLOAD``). Strings are a u16
length plus UTF-8, byte blobs a u32 length plus bytes, block runs a u32 count plus
(u32 start, u32 count) pairs. Every decoder checks each length against what is left and
insists the payload is consumed exactly: a malformed or truncated message raises
``WireError`` and never reaches the KV tensor. Block bytes themselves travel on the data
plane (UCX tags or torch.distributed point-to-point), not here.
"""

from __future__ import annotations

import asyncio
import enum
import struct
from dataclasses import dataclass

from tandem.kvtransfer.common import KVLayout

MAGIC = b"TKV1"
VERSION = 1
HEADER = struct.Struct("!4sBBHI")
MAX_PAYLOAD = 1 << 20  # a READ of 100k runs still fits
MAX_RUNS = 1 << 16


class WireError(ValueError):
    """A control message that does not parse; the connection that sent it is dropped."""


class MsgType(enum.IntEnum):
    HELLO = 1  # loader -> server: its layout and data-plane info
    HELLO_OK = 2  # server -> loader: its layout and data-plane info
    REFUSE = 3  # either way: the connection is refused (e.g. a layout mismatch)
    READ = 4  # loader -> server: send these blocks of that leased request
    READ_ERROR = 5  # server -> loader: that READ cannot be served
    DONE = 6  # loader -> server: every block arrived, the lease can go


@dataclass(frozen=True)
class Hello:
    layout: KVLayout
    info: bytes  # the data plane's connect info (a UCX worker address, a store port ...)


@dataclass(frozen=True)
class Refuse:
    reason: str


@dataclass(frozen=True)
class Read:
    transfer_id: int
    tag: int  # first data-plane tag; run i uses tag + i
    request_id: str  # the prefill engine's request id
    runs: list[tuple[int, int]]  # (first source block id, number of blocks)


@dataclass(frozen=True)
class ReadError:
    transfer_id: int
    reason: str


@dataclass(frozen=True)
class Done:
    transfer_id: int
    request_id: str


Message = Hello | Refuse | Read | ReadError | Done


class _Writer:
    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def u32(self, v: int) -> None:
        self.parts.append(struct.pack("!I", v))

    def u64(self, v: int) -> None:
        self.parts.append(struct.pack("!Q", v))

    def text(self, s: str) -> None:
        data = s.encode()[:65535]
        self.parts.append(struct.pack("!H", len(data)) + data)

    def blob(self, b: bytes) -> None:
        self.parts.append(struct.pack("!I", len(b)) + b)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = memoryview(data), 0

    def take(self, n: int, what: str) -> bytes:
        if n > len(self.data) - self.pos:
            raise WireError(f"truncated message: {what} needs {n} bytes")
        out = bytes(self.data[self.pos : self.pos + n])
        self.pos += n
        return out

    def u32(self, what: str) -> int:
        return struct.unpack("!I", self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack("!Q", self.take(8, what))[0]

    def text(self, what: str) -> str:
        n = struct.unpack("!H", self.take(2, what))[0]
        try:
            return self.take(n, what).decode()
        except UnicodeDecodeError as e:
            raise WireError(f"{what}: not UTF-8") from e

    def blob(self, what: str) -> bytes:
        return self.take(self.u32(what), what)

    def end(self) -> None:
        if self.pos != len(self.data):
            raise WireError(f"{len(self.data) - self.pos} trailing bytes after the message")


_LAYOUT_TEXT = ("model", "dtype", "layout")
_LAYOUT_INT = ("block_size", "num_layers", "num_kv_heads", "head_dim")


def encode(msg: Message, kind: MsgType | None = None) -> bytes:
    """Header plus payload; ``kind`` picks HELLO or HELLO_OK for a ``Hello``."""
    w = _Writer()
    if isinstance(msg, Hello):
        kind = kind or MsgType.HELLO
        for name in _LAYOUT_TEXT:
            w.text(getattr(msg.layout, name))
        for name in _LAYOUT_INT:
            w.u32(getattr(msg.layout, name))
        w.blob(msg.info)
    elif isinstance(msg, Refuse):
        kind = MsgType.REFUSE
        w.text(msg.reason)
    elif isinstance(msg, Read):
        kind = MsgType.READ
        w.u64(msg.transfer_id)
        w.u64(msg.tag)
        w.text(msg.request_id)
        w.u32(len(msg.runs))
        w.parts += [struct.pack("!II", start, n) for start, n in msg.runs]
    elif isinstance(msg, ReadError):
        kind = MsgType.READ_ERROR
        w.u64(msg.transfer_id)
        w.text(msg.reason)
    elif isinstance(msg, Done):
        kind = MsgType.DONE
        w.u64(msg.transfer_id)
        w.text(msg.request_id)
    else:
        raise TypeError(f"not a wire message: {type(msg).__name__}")
    payload = b"".join(w.parts)
    if len(payload) > MAX_PAYLOAD:
        raise WireError(f"message of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return HEADER.pack(MAGIC, VERSION, kind, 0, len(payload)) + payload


def decode_header(header: bytes) -> tuple[MsgType, int]:
    """(message type, payload length) of a 12-byte header."""
    if len(header) != HEADER.size:
        raise WireError(f"truncated header: {len(header)} of {HEADER.size} bytes")
    magic, version, kind, reserved, length = HEADER.unpack(header)
    if magic != MAGIC:
        raise WireError(f"bad magic {magic!r}: not a Tandem KV peer")
    if version != VERSION:
        raise WireError(f"wire version {version} (this side speaks {VERSION})")
    if kind not in MsgType._value2member_map_ or reserved:
        raise WireError(f"unknown message type {kind} (reserved {reserved})")
    if length > MAX_PAYLOAD:
        raise WireError(f"payload length {length} exceeds {MAX_PAYLOAD}")
    return MsgType(kind), length


def decode_payload(kind: MsgType, payload: bytes) -> tuple[MsgType, Message]:
    r = _Reader(payload)
    msg: Message
    if kind in (MsgType.HELLO, MsgType.HELLO_OK):
        text = {name: r.text(name) for name in _LAYOUT_TEXT}
        ints = {name: r.u32(name) for name in _LAYOUT_INT}
        msg = Hello(KVLayout(**text, **ints), r.blob("info"))
    elif kind is MsgType.REFUSE:
        msg = Refuse(r.text("reason"))
    elif kind is MsgType.READ:
        transfer_id, tag, request_id = r.u64("transfer_id"), r.u64("tag"), r.text("request_id")
        num_runs = r.u32("num_runs")
        if num_runs > MAX_RUNS:
            raise WireError(f"num_runs {num_runs} exceeds {MAX_RUNS}")
        runs = [struct.unpack("!II", r.take(8, "runs")) for _ in range(num_runs)]
        msg = Read(transfer_id, tag, request_id, [(int(a), int(b)) for a, b in runs])
    elif kind is MsgType.READ_ERROR:
        msg = ReadError(r.u64("transfer_id"), r.text("reason"))
    else:
        msg = Done(r.u64("transfer_id"), r.text("request_id"))
    r.end()
    return kind, msg


def decode(data: bytes) -> tuple[MsgType, Message]:
    """One whole message (header plus payload) from bytes."""
    kind, length = decode_header(data[: HEADER.size])
    if len(data) - HEADER.size != length:
        raise WireError(f"payload is {len(data) - HEADER.size} bytes, header says {length}")
    return decode_payload(kind, data[HEADER.size :])


async def read_message(reader: asyncio.StreamReader) -> tuple[MsgType, Message]:
    """The next message; ``asyncio.IncompleteReadError`` when the peer hangs up."""
    kind, length = decode_header(await reader.readexactly(HEADER.size))
    return decode_payload(kind, await reader.readexactly(length))


def block_runs(src: list[int], dst: list[int]) -> list[tuple[int, int, int]]:
    """(first source block, first destination block, count) for runs consecutive on both
    sides: each run is one contiguous region of each KV tensor, so one message."""
    if len(src) != len(dst):
        raise ValueError(f"block_runs: {len(src)} source blocks but {len(dst)} destinations")
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src, dst):
        if runs and runs[-1][0] + runs[-1][2] == s and runs[-1][1] + runs[-1][2] == d:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((s, d, 1))
    return runs
