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
        uvicorn_log_level=args.uvicorn_log_level,
        model_path=args.model,
    )
