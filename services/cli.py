"""The ``tandem`` command. Engine flags are generated from the config fields, so their
``--help`` is the fields' documentation."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from tandem.engine.config import EngineConfig
from tandem.services.flags import add_field_flags


def add_engine_args(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ("model",)) -> None:
    """One flag per engine config field: ``--block-size``, ``--enable-prefix-caching`` ..."""
    fields = [f for name, (_, f) in EngineConfig.option_fields().items() if name not in skip]
    add_field_flags(parser, fields)


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
    quantization, runner = llm.engine.config.model.quantization, llm.engine.runner
    if quantization is not None:
        before, after = runner.weight_bytes_before / 2**20, runner.weight_bytes_after / 2**20
        print(f"weights ({quantization}): {before:.1f} MiB -> {after:.1f} MiB")
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


def _cmd_instance(args: argparse.Namespace) -> int:
    from tandem.services.pd.server import instance_config, run_instance

    return run_instance(args.command, instance_config(args), engine_options(args))


def _cmd_router(args: argparse.Namespace) -> int:
    from tandem.services.api_server.config import server_config
    from tandem.services.router.config import router_config
    from tandem.services.router.server import run_router

    return run_router(server_config(args), router_config(args))


def _cmd_up(args: argparse.Namespace) -> int:
    from tandem.services.up import run_up

    return run_up(args)


def _add_disaggregated(sub: argparse._SubParsersAction) -> None:
    """``tandem prefill``, ``tandem decode``, ``tandem router`` and ``tandem up``."""
    from tandem.services.api_server.config import add_server_args
    from tandem.services.pd.server import ENGINE_FLAGS_SKIPPED, add_instance_args
    from tandem.services.router.config import add_router_args
    from tandem.services.up import UP_ENGINE_FLAGS_SKIPPED, add_up_args

    for role in ("prefill", "decode"):
        inst = sub.add_parser(role, help=f"Serve a {role} instance over gRPC.")
        _add_model_arg(inst)
        add_instance_args(inst)
        add_engine_args(inst, skip=ENGINE_FLAGS_SKIPPED)
        inst.set_defaults(func=_cmd_instance)

    rt = sub.add_parser("router", help="The OpenAI-compatible HTTP API over prefill/decode.")
    rt.add_argument(
        "model", nargs="?", default=None, help="The model's name for clients (and tokenizer)."
    )
    add_server_args(rt)
    add_router_args(rt)
    rt.set_defaults(func=_cmd_router)

    # up: the router's HTTP flags, the instances' engine flags, its own counts.
    up = sub.add_parser("up", help="Router, prefill and decode instances on this machine.")
    _add_model_arg(up)
    for add_flags in (
        add_up_args,
        add_server_args,
        lambda p: add_router_args(p, skip=("prefill", "decode")),  # up lists the instances
        lambda p: add_instance_args(p, only=("kv_transport",)),
        lambda p: add_engine_args(p, skip=ENGINE_FLAGS_SKIPPED + UP_ENGINE_FLAGS_SKIPPED),
    ):
        add_flags(up)
    up.set_defaults(func=_cmd_up)


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

    _add_disaggregated(sub)

    bench = sub.add_parser("bench", help="Benchmarks.")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    from tandem.benchmarks import throughput

    tp = bench_sub.add_parser("throughput", help=throughput.__doc__.splitlines()[0])
    throughput.add_args(tp)
    add_engine_args(tp)
    tp.set_defaults(func=throughput.main)

    from tandem.benchmarks import step as bench_step

    bst = bench_sub.add_parser("step", help=bench_step.__doc__.splitlines()[0])
    bench_step.add_args(bst)
    add_engine_args(bst)
    bst.set_defaults(func=bench_step.main)

    from tandem.benchmarks import kernels as bench_kernels

    bk = bench_sub.add_parser("kernels", help=bench_kernels.__doc__.splitlines()[0])
    bench_kernels.add_args(bk)
    bk.set_defaults(func=bench_kernels.main)

    from tandem.benchmarks import serve as bench_serve

    bs = bench_sub.add_parser("serve", help=bench_serve.__doc__.splitlines()[0])
    bench_serve.add_args(bs)
    bs.set_defaults(func=bench_serve.main)

    from tandem.benchmarks import kvtransfer as bench_kv

    kvt = bench_sub.add_parser("kvtransfer", help=bench_kv.__doc__.splitlines()[0])
    bench_kv.add_args(kvt)
    kvt.set_defaults(func=bench_kv.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
