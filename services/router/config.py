"""The router's own settings (its HTTP settings are the API server's ``ServerConfig``).
Stdlib only, so ``tandem --help`` does not import gRPC."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

from tandem.engine.config import doc
from tandem.services.flags import add_field_flags


@dataclass(frozen=True)
class RouterConfig:
    prefill: str = doc(
        "", "Prefill instances, HOST:PORT[,HOST:PORT...]; none: decode instances run prompts."
    )
    decode: str = doc("", "Decode instances, HOST:PORT[,HOST:PORT...] (at least one).")
    remote_prefill_min_tokens: int = doc(
        16, "Prompts shorter than this many tokens skip the prefill hop (decode computes them)."
    )
    instance_poll_interval: float = doc(
        0.5, "Seconds between load and health polls of each instance."
    )
    connect_timeout: float = doc(
        120.0, "At start-up, seconds to wait for every instance to answer."
    )


def add_router_args(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """``--prefill``, ``--decode``, ``--remote-prefill-min-tokens``, ... (less ``skip``)."""
    flags = [f for f in fields(RouterConfig) if f.name not in skip]
    add_field_flags(parser.add_argument_group("router"), flags)


def router_config(args: argparse.Namespace) -> RouterConfig:
    config = RouterConfig(**{f.name: getattr(args, f.name) for f in fields(RouterConfig)})
    if config.remote_prefill_min_tokens < 0:
        raise ValueError("--remote-prefill-min-tokens must be >= 0")
    if config.instance_poll_interval <= 0:
        raise ValueError("--instance-poll-interval must be > 0")
    return config
