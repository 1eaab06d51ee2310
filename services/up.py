"""``tandem up [MODEL] [--prefill N] [--decode M] [--port 8000]``: the disaggregated
deployment on one machine. Starts N ``tandem prefill`` and M ``tandem decode`` instances
and a ``tandem router`` in front as child processes, waits until the router answers
``/health`` (it waits for every instance first), prints the address, and on Ctrl-C or
SIGTERM stops the router, then the instances, each with its graceful drain.

The children get the CPU cores split between the instances (``OMP_NUM_THREADS``), so two
engines on two cores do not each start a thread per core and fight over them. They run in
their own sessions, so a terminal's Ctrl-C reaches this process alone and the shutdown
order holds.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from tandem.engine.config import EngineConfig
from tandem.services.api_server.config import ServerConfig
from tandem.services.launch import tandem_argv
from tandem.services.router.config import RouterConfig

_POLL_SECONDS = 0.25
# Engine flags that must differ between instances, so up sets none of them.
UP_ENGINE_FLAGS_SKIPPED = ("engine_id", "kv_transfer_port")


def add_up_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("deployment")
    group.add_argument(
        "--prefill", dest="num_prefill", type=int, default=1, help="Prefill instances."
    )
    group.add_argument("--decode", dest="num_decode", type=int, default=1, help="Decode instances.")
    group.add_argument(
        "--threads-per-instance",
        type=int,
        default=None,
        help="Torch threads of each instance; default: the cores split between them.",
    )
    group.add_argument(
        "--startup-timeout", type=float, default=600.0, help="Seconds to wait until all are up."
    )


def to_argv(values: dict[str, Any], defaults: dict[str, Any]) -> list[str]:
    """Flags reproducing the non-default ``values`` (field name -> value)."""
    argv: list[str] = []
    for name, value in values.items():
        if value == defaults.get(name):
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list | tuple):
            argv += [flag, *map(str, value)]
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _field_values(
    cls: Any, args: argparse.Namespace, skip: tuple[str, ...] = ()
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the parsed values of ``cls``'s fields, their defaults)."""
    names = [f.name for f in dataclasses.fields(cls) if f.name not in skip]
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    return {n: getattr(args, n) for n in names if hasattr(args, n)}, defaults


def child_commands(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """(name, argv) of every child: the instances first, the router last."""
    from tandem.services.pd.server import ENGINE_FLAGS_SKIPPED

    if args.num_prefill < 0 or args.num_decode < 1:
        raise ValueError("--decode must be >= 1 and --prefill >= 0")
    base = tandem_argv()
    model = [args.model] if args.model else []
    engine_flags: list[str] = []
    for _, (_, f) in EngineConfig.option_fields().items():
        if f.name not in ENGINE_FLAGS_SKIPPED + UP_ENGINE_FLAGS_SKIPPED:
            engine_flags += to_argv({f.name: getattr(args, f.name)}, {f.name: f.default})
    host = "127.0.0.1"
    children, addresses = [], {"prefill": [], "decode": []}
    for role, count in (("prefill", args.num_prefill), ("decode", args.num_decode)):
        for index in range(count):
            port = _free_port(host)
            addresses[role].append(f"{host}:{port}")
            argv = [*base, role, *model, "--host", host, "--port", str(port)]
            argv += ["--kv-transport", args.kv_transport, *engine_flags]
            children.append((f"{role}-{index}", argv))
    server_values, server_defaults = _field_values(ServerConfig, args, skip=("model_path",))
    router_values, router_defaults = _field_values(RouterConfig, args, skip=("prefill", "decode"))
    # The instances may still be loading (or converting the model) when the router starts.
    router_values["connect_timeout"] = max(args.connect_timeout, args.startup_timeout)
    router = [*base, "router", *model, *to_argv(server_values, server_defaults)]
    router += to_argv(router_values, router_defaults)
    router += ["--decode", ",".join(addresses["decode"])]
    if addresses["prefill"]:
        router += ["--prefill", ",".join(addresses["prefill"])]
    children.append(("router", router))
    return children


def _child_env(args: argparse.Namespace) -> dict[str, str]:
    num_instances = args.num_prefill + args.num_decode
    threads = args.threads_per_instance or max(1, (os.cpu_count() or 1) // num_instances)
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    env.setdefault("UCXPY_PROGRESS_MODE", "blocking")  # no busy-polling progress thread
    return env


def run_up(args: argparse.Namespace) -> int:
    children = child_commands(args)
    env = _child_env(args)
    url = f"http://{args.host}:{args.port}"
    stop = {"signal": None}

    def on_signal(signum: int, _frame: Any) -> None:
        stop["signal"] = signum

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    procs: list[tuple[str, subprocess.Popen]] = []
    try:
        for name, argv in children:
            procs.append((name, subprocess.Popen(argv, env=env, start_new_session=True)))
        status = _wait_up(procs, url + "/health", args.startup_timeout, stop)
        if status is not None:
            return status
        print(
            f"Tandem is up: {url}/v1 ({args.num_prefill} prefill, {args.num_decode} decode)",
            flush=True,
        )
        while stop["signal"] is None:
            for name, proc in procs:
                if proc.poll() is not None:
                    print(f"tandem up: {name} exited with {proc.returncode}", file=sys.stderr)
                    return 1
            time.sleep(_POLL_SECONDS)
        return 0
    finally:
        _shutdown(procs, args.shutdown_timeout)


def _wait_up(procs, health_url: str, timeout: float, stop: dict) -> int | None:
    """None once the router answers /health; an exit status if something failed first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stop["signal"] is not None:
            return 0
        for name, proc in procs:
            if proc.poll() is not None:
                print(
                    f"tandem up: {name} exited with {proc.returncode} while starting",
                    file=sys.stderr,
                )
                return 1
        try:
            with urllib.request.urlopen(health_url, timeout=2) as response:
                if response.status == 200:
                    return None
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(_POLL_SECONDS)
    print(f"tandem up: not healthy after {timeout} s", file=sys.stderr)
    return 1


def _shutdown(procs: list[tuple[str, subprocess.Popen]], grace: float) -> None:
    """SIGTERM the router, then the instances (each drains); kill what outlives ``grace``."""
    for group in ([p for n, p in procs if n == "router"], [p for n, p in procs if n != "router"]):
        for proc in group:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace + 5
        for proc in group:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
