"""The messages between a front end (``AsyncLLM``) and its engine core, and their codec.

Typed msgpack (msgspec): each side decodes into exactly these types and rejects anything
else, so a message is data, never code (no pickle). Inputs go front end -> core; outputs
come back batched per step (every request's news of a step in one ``Outputs``), with the
core's stats and finished KV loads riding along.
"""

from __future__ import annotations

from typing import Any

import msgspec
from tandem.engine.core import EngineCoreRequest, EngineInfo, EngineStats
from tandem.engine.scheduler_output import EngineCoreOutput
from tandem.kvtransfer.base import TransferRecord


class AddRequest(msgspec.Struct, tag="add"):
    request: EngineCoreRequest


class AbortRequests(msgspec.Struct, tag="abort"):
    request_ids: list[str]
    stopped: bool = False  # finished by a stop string in the front end, not aborted


class UtilityCall(msgspec.Struct, tag="call"):
    """Run one of the core's read-only utilities (``core_loop.UTILITIES``)."""

    call_id: int
    method: str


class Shutdown(msgspec.Struct, tag="shutdown"):
    pass


CoreInput = AddRequest | AbortRequests | UtilityCall | Shutdown


class Ready(msgspec.Struct, tag="ready"):
    info: EngineInfo


class Failed(msgspec.Struct, tag="failed"):
    """The core could not start, or died: why (with its traceback)."""

    error: str


class UtilityResult(msgspec.Struct):
    call_id: int
    result: Any = None
    error: str | None = None


class Outputs(msgspec.Struct, tag="outputs"):
    outputs: list[EngineCoreOutput]
    stats: EngineStats
    transfer_records: list[TransferRecord] = []
    utility_results: list[UtilityResult] = []


CoreOutput = Ready | Failed | Outputs

_encoder = msgspec.msgpack.Encoder()
_input_decoder = msgspec.msgpack.Decoder(CoreInput)
_output_decoder = msgspec.msgpack.Decoder(CoreOutput)


def encode(message: CoreInput | CoreOutput) -> bytes:
    return _encoder.encode(message)


def decode_input(data: bytes) -> CoreInput:
    """Raises ``msgspec.DecodeError`` / ``ValidationError`` for anything malformed."""
    return _input_decoder.decode(data)


def decode_output(data: bytes) -> CoreOutput:
    return _output_decoder.decode(data)
