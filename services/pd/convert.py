"""Engine types <-> their protobuf messages (``proto/tandem.proto``), both directions.

The router encodes requests and decodes deltas with these; the prefill and decode services
do the reverse, so every hop carries typed fields only (never pickle, never JSON blobs).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tandem.engine.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestOutput
from tandem.engine.sampling_params import RequestOutputKind, SamplingParams
from tandem.proto import tandem_pb2 as pb

_FINISH_TO_PROTO = {
    None: pb.FINISH_REASON_UNSPECIFIED,
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
}
_FINISH_FROM_PROTO = {v: k for k, v in _FINISH_TO_PROTO.items()}

# SamplingParams fields carried one to one; the optional ones travel with presence.
_PLAIN_FIELDS = (
    "n",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "ignore_eos",
    "min_tokens",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "include_stop_str_in_output",
)
_OPTIONAL_FIELDS = ("seed", "max_tokens", "logprobs")
_KV_FIELDS = (
    "remote_engine_id",
    "remote_request_id",
    "remote_block_ids",
    "num_remote_tokens",
    "remote_host",
    "remote_port",
)


def sampling_params_to_proto(params: SamplingParams) -> pb.SamplingParams:
    if params.prompt_logprobs is not None:
        raise ValueError("prompt_logprobs: not carried between services")
    msg = pb.SamplingParams(stop=list(params.stop or []))
    msg.stop_token_ids.extend(params.stop_token_ids or [])
    try:
        for name in _PLAIN_FIELDS:
            setattr(msg, name, getattr(params, name))
        for name in _OPTIONAL_FIELDS:
            if getattr(params, name) is not None:
                setattr(msg, name, getattr(params, name))
    except (ValueError, TypeError) as e:  # out of the wire type's range
        raise ValueError(f"{name}: cannot be sent to another instance ({e})") from e
    return msg


def sampling_params_from_proto(msg: pb.SamplingParams) -> SamplingParams:
    """Raises SamplingParams' ValueError (naming the field) for values it refuses."""
    values: dict[str, Any] = {name: getattr(msg, name) for name in _PLAIN_FIELDS}
    for name in _OPTIONAL_FIELDS:
        values[name] = getattr(msg, name) if msg.HasField(name) else None
    values["stop"] = list(msg.stop)
    values["stop_token_ids"] = list(msg.stop_token_ids)
    return SamplingParams(**values, output_kind=RequestOutputKind.DELTA)


def generate_request_to_proto(
    request_id: str, prompt: dict[str, Any], params: SamplingParams
) -> pb.GenerateRequest:
    msg = pb.GenerateRequest(
        request_id=request_id,
        prompt_token_ids=list(prompt["prompt_token_ids"]),
        sampling_params=sampling_params_to_proto(params),
    )
    if prompt.get("cache_salt") is not None:
        msg.cache_salt = prompt["cache_salt"]
    return msg


def prompt_from_proto(msg: pb.GenerateRequest) -> dict[str, Any]:
    """The engine's dict prompt of a request message."""
    prompt: dict[str, Any] = {"prompt_token_ids": list(msg.prompt_token_ids)}
    if msg.HasField("cache_salt"):
        prompt["cache_salt"] = msg.cache_salt
    return prompt


def kv_params_to_proto(params: dict[str, Any]) -> pb.KVTransferParams:
    """The connector's plain dict; host and port may be missing (in-process loopback)."""
    return pb.KVTransferParams(
        remote_engine_id=str(params["remote_engine_id"]),
        remote_request_id=str(params["remote_request_id"]),
        remote_block_ids=[int(b) for b in params["remote_block_ids"]],
        num_remote_tokens=int(params["num_remote_tokens"]),
        remote_host=str(params.get("remote_host") or ""),
        remote_port=int(params.get("remote_port") or 0),
    )


def kv_params_from_proto(msg: pb.KVTransferParams) -> dict[str, Any]:
    params = {name: getattr(msg, name) for name in _KV_FIELDS}
    params["remote_block_ids"] = list(msg.remote_block_ids)
    return params


def logprobs_to_proto(positions: list[PositionLogprobs]) -> list[pb.PositionLogprobs]:
    """Per-position logprobs (a delta's, or a continued request's) as messages."""
    out = []
    for position in positions:
        entries = [
            pb.Logprob(
                token_id=token_id,
                logprob=lp.logprob,
                rank=lp.rank,
                decoded_token=lp.decoded_token,
            )
            for token_id, lp in position.items()
        ]
        out.append(pb.PositionLogprobs(entries=entries))
    return out


def logprobs_from_proto(positions: list[pb.PositionLogprobs]) -> list[PositionLogprobs]:
    """The reverse of ``logprobs_to_proto``."""
    return [
        {
            e.token_id: Logprob(
                e.logprob, e.rank, e.decoded_token if e.HasField("decoded_token") else None
            )
            for e in position.entries
        }
        for position in positions
    ]


def _completion_to_proto(c: CompletionOutput) -> pb.CompletionDelta:
    msg = pb.CompletionDelta(
        index=c.index,
        text=c.text,
        token_ids=c.token_ids,
        logprobs=logprobs_to_proto(c.logprobs or []),
        cumulative_logprob=c.cumulative_logprob,
        finish_reason=_FINISH_TO_PROTO[c.finish_reason],
    )
    if isinstance(c.stop_reason, str):
        msg.stop_string = c.stop_reason
    elif c.stop_reason is not None:
        msg.stop_token_id = c.stop_reason
    return msg


def _completion_from_proto(msg: pb.CompletionDelta, with_logprobs: bool) -> CompletionOutput:
    kind = msg.WhichOneof("stop_reason")
    return CompletionOutput(
        index=msg.index,
        text=msg.text,
        token_ids=list(msg.token_ids),
        cumulative_logprob=msg.cumulative_logprob if msg.HasField("cumulative_logprob") else None,
        logprobs=logprobs_from_proto(msg.logprobs) if with_logprobs else None,
        finish_reason=_FINISH_FROM_PROTO[msg.finish_reason],
        stop_reason=None if kind is None else getattr(msg, kind),
    )


def delta_to_proto(output: RequestOutput) -> pb.RequestDelta:
    msg = pb.RequestDelta(
        outputs=[_completion_to_proto(c) for c in output.outputs],
        finished=output.finished,
        num_cached_tokens=output.num_cached_tokens,
        error=str(output.metrics.get("error") or ""),
    )
    if output.metrics.get("queue_time") is not None:
        msg.queue_seconds = output.metrics["queue_time"]
    return msg


def delta_from_proto(
    msg: pb.RequestDelta, request_id: str, prompt: dict[str, Any], with_logprobs: bool
) -> RequestOutput:
    """A RequestOutput delta; ``with_logprobs``: the request asked for them (an empty list
    then means 'none in this delta', not 'not asked for')."""
    metrics: dict[str, Any] = {}
    if msg.error:
        metrics["error"] = msg.error
    if msg.HasField("queue_seconds"):
        metrics["queue_time"] = msg.queue_seconds
    if msg.HasField("kv_transfer") and msg.kv_transfer.ok:
        metrics["kv_transfer_seconds"] = msg.kv_transfer.seconds
        metrics["kv_transfer_bytes"] = msg.kv_transfer.num_bytes
    return RequestOutput(
        request_id=request_id,
        prompt=prompt.get("prompt"),
        prompt_token_ids=list(prompt["prompt_token_ids"]),
        prompt_logprobs=None,
        outputs=[_completion_from_proto(c, with_logprobs) for c in msg.outputs],
        finished=msg.finished,
        num_cached_tokens=msg.num_cached_tokens,
        metrics=metrics,
    )


def unfinished(output: RequestOutput) -> RequestOutput:
    """``output`` with its finish reasons cleared: a prefill engine's first token, whose
    'length' only means 'the decode side takes it from here'."""
    outputs = [dataclasses.replace(c, finish_reason=None, stop_reason=None) for c in output.outputs]
    return dataclasses.replace(output, outputs=outputs, finished=False)
