"""The server's own settings (the engine's are ``EngineConfig``) and their CLI flags.

Stdlib only, so ``tandem --help`` does not import FastAPI. Flags use vLLM's spelling.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

from tandem.engine import envs
from tandem.engine.config import doc, parse_size
from tandem.engine.model_loader import DEFAULT_MODEL_NAME
from tandem.services.flags import add_field_flags


@dataclass(frozen=True)
class ServerConfig:
    host: str = doc("127.0.0.1", "Address to listen on; 0.0.0.0 listens on every interface.")
    port: int = doc(8000, "Port to listen on.")
    served_model_name: tuple[str, ...] = doc(
        (),
        "Names clients use in the 'model' field; the first is the one responses carry. "
        "Default: the model argument, or the default model's name.",
        nargs="+",
        type=str,
    )
    api_key: str | None = doc(
        None,
        "Require 'Authorization: Bearer KEY' on /v1/*, /tokenize and /detokenize; "
        "defaults to $TANDEM_API_KEY.",
    )
    shutdown_timeout: float = doc(
        30.0, "On SIGTERM, seconds to let running requests finish before exiting."
    )
    max_request_body_bytes: int = doc(
        8 * 1024 * 1024, "Largest request body accepted (413 above), e.g. '8MiB'.", type=parse_size
    )
    h11_max_incomplete_event_size: int = doc(
        64 * 1024, "Largest request line plus headers in bytes (431 above)."
    )
    body_read_timeout: float = doc(
        30.0, "Seconds to wait for the rest of a request body before answering 408."
    )
    tokenizer_threads: int = doc(
        2, "Threads tokenizing requests, each with its own copy of the tokenizer."
    )
    max_sequences_per_request: int = doc(
        256, "Most sequences one request may ask for: its prompts times n (400 above)."
    )
    max_waiting_requests: int = doc(
        1024,
        "Refuse new requests with 503 and Retry-After while this many sequences wait "
        "for the engine (0: no limit).",
    )
    max_concurrent_requests: int = doc(
        2048, "Refuse new /v1 requests with 503 and Retry-After beyond this many (0: no limit)."
    )
    enable_prompt_tokens_details: bool = doc(
        False,
        "Report usage.prompt_tokens_details.cached_tokens. Off by default, as in vLLM: "
        "the count tells a client how much of its prompt other requests sent before it "
        "(separate tenants by cache_salt).",
    )
    uvicorn_log_level: str = doc(
        "info", "uvicorn's log level.", choices=("debug", "info", "warning", "error")
    )
    # Not a flag: the model argument as given (None: the default model).
    model_path: str | None = None

    @property
    def model_name(self) -> str:
        """The name responses carry."""
        return self.served_model_name[0]


def add_server_args(parser: argparse.ArgumentParser) -> None:
    """``--host``, ``--port``, ``--served-model-name``, ``--api-key``, ... for ``tandem serve``."""
    flags = [f for f in fields(ServerConfig) if f.name != "model_path"]
    add_field_flags(parser.add_argument_group("server"), flags)


def server_config(args: argparse.Namespace) -> ServerConfig:
    """The settings a parsed ``tandem serve`` command line holds."""
    if args.shutdown_timeout < 0:
        raise ValueError(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
    if args.max_request_body_bytes < 1:
        raise ValueError("--max-request-body-bytes must be >= 1")
    if not args.body_read_timeout > 0:
        raise ValueError(f"--body-read-timeout must be > 0, got {args.body_read_timeout}")
    for flag in ("tokenizer_threads", "max_sequences_per_request"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    for flag in ("max_waiting_requests", "max_concurrent_requests"):
        if getattr(args, flag) < 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    names = tuple(args.served_model_name or [args.model or DEFAULT_MODEL_NAME])
    return ServerConfig(
        host=args.host,
        port=args.port,
        served_model_name=names,
        api_key=args.api_key or envs.api_key(),
        shutdown_timeout=args.shutdown_timeout,
        max_request_body_bytes=args.max_request_body_bytes,
        h11_max_incomplete_event_size=args.h11_max_incomplete_event_size,
        body_read_timeout=args.body_read_timeout,
        tokenizer_threads=args.tokenizer_threads,
        max_sequences_per_request=args.max_sequences_per_request,
        max_waiting_requests=args.max_waiting_requests,
        max_concurrent_requests=args.max_concurrent_requests,
        enable_prompt_tokens_details=args.enable_prompt_tokens_details,
        uvicorn_log_level=args.uvicorn_log_level,
        model_path=args.model,
    )
