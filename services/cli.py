"""The ``tandem`` command. Engine flags are generated from the config fields, so their
``--help`` is the fields' documentation."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from typing import Any

from tandem.engine.config import EngineConfig


def _field_type(f: dataclasses.Field) -> type:
    hint = f.type if not isinstance(f.type, str) else eval(f.type, vars(typing) | {"str": str})  # noqa: S307
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return args[0]
    return hint


def add_engine_args(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ("model",)) -> None:
    """One flag per config field: ``--block-size``, ``--enable-prefix-caching`` ..."""
    for name, (_, f) in EngineConfig.option_fields().items():
        if name in skip:
            continue
        flag = "--" + name.replace("_", "-")
        kwargs: dict[str, Any] = {"help": f.metadata.get("help", ""), "dest": name}
        kind = _field_type(f)
        if kind is bool:
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=f.default, **kwargs
            )
            continue
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        parser.add_argument(flag, type=kind, default=f.default, **kwargs)


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """The engine options a parsed command line holds (defaults left out)."""
    options = {}
    for name, (_, f) in EngineConfig.option_fields().items():
        value = getattr(args, name, f.default)
        if value != f.default:
            options[name] = value
    return options


def _add_model_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        nargs="?",
        default=None,
        help=EngineConfig.option_fields()["model"][1].metadata["help"],
    )


def _cmd_generate(args: argparse.Namespace) -> int:
    from tandem.engine import LLM, SamplingParams

    llm = LLM(**engine_options(args))
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)
    prompts = args.prompt or ["Write a haiku about the sea.", "What is a KV cache in one sentence?"]
    outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
    for prompt, output in zip(prompts, outputs):
        print(f"\n>>> {prompt}\n{output.outputs[0].text}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from tandem.services.api_server.config import server_config
    from tandem.services.api_server.server import run_server

    return run_server(server_config(args), engine_options(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description="Tandem LLM inference engine")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="Offline chat generation on a few prompts (demo).")
    _add_model_arg(gen)
    gen.add_argument("--prompt", action="append", help="A user message; repeat for several.")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    add_engine_args(gen)
    gen.set_defaults(func=_cmd_generate)

    from tandem.services.api_server.config import add_server_args

    srv = sub.add_parser("serve", help="Serve the OpenAI-compatible HTTP API.")
    _add_model_arg(srv)
    add_server_args(srv)
    add_engine_args(srv)
    srv.set_defaults(func=_cmd_serve)

    bench = sub.add_parser("bench", help="Benchmarks.")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    from tandem.benchmarks import throughput

    tp = bench_sub.add_parser("throughput", help=throughput.__doc__.splitlines()[0])
    throughput.add_args(tp)
    add_engine_args(tp)
    tp.set_defaults(func=throughput.main)

    from tandem.benchmarks import serve as bench_serve

    bs = bench_sub.add_parser("serve", help=bench_serve.__doc__.splitlines()[0])
    bench_serve.add_args(bs)
    bs.set_defaults(func=bench_serve.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
