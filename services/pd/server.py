"""``tandem prefill`` and ``tandem decode``: an ``AsyncLLM`` with that role behind its
gRPC service, until SIGTERM. Stdlib-only at import, so ``tandem --help`` stays light."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, fields
from typing import Any

from tandem.engine.config import doc
from tandem.services.flags import add_field_flags

logger = logging.getLogger("tandem.pd")

KV_TRANSPORTS = ("ucx", "nccl")


@dataclass(frozen=True)
class InstanceConfig:
    host: str = doc("127.0.0.1", "Address the gRPC service listens on.")
    port: int = doc(50051, "Port the gRPC service listens on (0: any free port).")
    kv_transport: str = doc(
        "ucx", "How KV blocks move between prefill and decode instances.", choices=KV_TRANSPORTS
    )
    shutdown_timeout: float = doc(
        30.0, "On SIGTERM, seconds to let calls in flight finish before exiting."
    )


# Set by the command itself rather than by flags.
ENGINE_FLAGS_SKIPPED = ("model", "role", "kv_connector")


def add_instance_args(parser: argparse.ArgumentParser, only: tuple[str, ...] | None = None) -> None:
    """``--host``, ``--port``, ``--kv-transport``, ``--shutdown-timeout`` (or ``only`` those)."""
    flags = [f for f in fields(InstanceConfig) if only is None or f.name in only]
    add_field_flags(parser.add_argument_group("service"), flags)


def instance_config(args: argparse.Namespace) -> InstanceConfig:
    if args.shutdown_timeout < 0:
        raise ValueError(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
    return InstanceConfig(**{f.name: getattr(args, f.name) for f in fields(InstanceConfig)})


def run_instance(role: str, config: InstanceConfig, engine_options: dict[str, Any]) -> int:
    """Build the engine with ``role``, serve its role's gRPC service and InstanceService
    until SIGTERM; exit status."""
    import asyncio

    from tandem.engine.async_llm import AsyncLLM
    from tandem.services.api_server.server import setup_logging
    from tandem.services.pd.decode import DecodeServicer
    from tandem.services.pd.instance import serve_instance
    from tandem.services.pd.prefill import PrefillServicer

    setup_logging()
    options = {**engine_options, "role": role, "kv_connector": config.kv_transport}
    async_llm = AsyncLLM.from_options(**options)
    servicer = PrefillServicer(async_llm) if role == "prefill" else DecodeServicer(async_llm)
    try:
        asyncio.run(serve_instance(servicer, config.host, config.port, config.shutdown_timeout))
    except OSError as e:
        logger.error("%s", e)
        return 1
    finally:
        async_llm.shutdown()  # the engine core closes its KV listener and connections
    logger.info("drained and stopped")
    return 0
