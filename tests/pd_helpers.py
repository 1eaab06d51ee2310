"""Helpers for the disaggregated-serving tests: a tiny random Llama with the default
model's tokenizer (fast to load, real text), prefill and decode gRPC services in this
process over the loopback connector, and real ``tandem prefill|decode``
processes (the router's is ``api_server_process.ServerProcess``)."""

from __future__ import annotations

import asyncio
import os
import pathlib
import random
import shutil
import subprocess
import threading
import time
from typing import Any, NamedTuple

import grpc
import httpx
import pytest
from api_server_process import free_port
from tandem.proto import tandem_pb2 as pb
from tandem.proto import tandem_pb2_grpc as pb_grpc
from tandem.services.launch import tandem_argv

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
ENGINE_OPTIONS = dict(dtype="float32", num_kv_blocks=64, max_model_len=256)


def make_tiny_model(default_model_dir: pathlib.Path, out_dir: pathlib.Path) -> pathlib.Path:
    """A 2-layer random Llama (GQA 4:2) speaking SmolLM2's vocabulary, saved to ``out_dir``."""
    import torch
    from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

    source = AutoConfig.from_pretrained(default_model_dir)
    config = LlamaConfig(
        vocab_size=source.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=source.bos_token_id,
        eos_token_id=source.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out_dir)
    for name in TOKENIZER_FILES:
        if (default_model_dir / name).is_file():
            shutil.copy(default_model_dir / name, out_dir / name)
    return out_dir


@pytest.fixture(scope="module", name="model_dir")
def model_dir_fixture(tmp_path_factory, default_model_dir) -> pathlib.Path:
    """The tiny model, once per test module (``model_dir = pd_helpers.model_dir_fixture``)."""
    return make_tiny_model(default_model_dir, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module", name="llm")
def llm_fixture(model_dir):
    """Colocated ``LLM`` on the tiny model: the reference answers."""
    from tandem.engine import LLM

    return LLM(str(model_dir), **ENGINE_OPTIONS)


@pytest.fixture(scope="module", name="pair")
def pair_fixture(model_dir):
    """Prefill and decode services on the tiny model in this process (3 s leases)."""
    pair = InProcessPair(model_dir, kv_lease_seconds=3.0)
    yield pair
    pair.close()


@pytest.fixture(scope="module", name="instances")
def instances_fixture(pair):
    """Blocking (PrefillService, DecodeService) stubs of ``pair``."""
    return stubs(pair.prefill_address, pair.decode_address)


@pytest.fixture(scope="module", name="instance_services")
def instance_services_fixture(pair):
    """Blocking InstanceService stubs (the prefill's, the decode's) of ``pair``."""
    return instance_stubs(pair.prefill_address, pair.decode_address)


class InProcessPair:
    """A prefill and a decode service (loopback KV) on free ports, served from a
    background event loop; ``close()`` stops both and their engines."""

    def __init__(self, model_dir: pathlib.Path, **options: Any) -> None:
        from tandem.engine.async_llm import AsyncLLM
        from tandem.services.pd.decode import DecodeServicer
        from tandem.services.pd.prefill import PrefillServicer

        common = {**ENGINE_OPTIONS, "kv_connector": "loopback", **options}
        model = str(model_dir)
        self.prefill_llm = AsyncLLM.from_options(model, role="prefill", **common)
        self.decode_llm = AsyncLLM.from_options(model, role="decode", **common)
        self.servicers = (PrefillServicer(self.prefill_llm), DecodeServicer(self.decode_llm))
        self.ports: list[int] = []
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("in-process gRPC services did not start")
        self.prefill_address = f"127.0.0.1:{self.ports[0]}"
        self.decode_address = f"127.0.0.1:{self.ports[1]}"

    def _run(self) -> None:
        from tandem.services.pd.instance import serve_instance

        async def main() -> None:
            def started(port: int) -> None:
                self.ports.append(port)
                if len(self.ports) == 2:
                    self._ready.set()

            tasks = []
            for servicer in self.servicers:
                tasks.append(
                    asyncio.ensure_future(serve_instance(servicer, "127.0.0.1", 0, 1.0, started))
                )
                while len(self.ports) < len(tasks):  # ports in prefill, decode order
                    await asyncio.sleep(0.01)
            self._tasks = tasks
            await asyncio.gather(*tasks, return_exceptions=True)

        self._loop.run_until_complete(main())

    def close(self) -> None:
        for task in getattr(self, "_tasks", []):
            self._loop.call_soon_threadsafe(task.cancel)
        self._thread.join(timeout=30)
        self.prefill_llm.shutdown()
        self.decode_llm.shutdown()


def stubs(prefill_address: str, decode_address: str):
    """Blocking stubs (PrefillService, DecodeService) for a test's own calls."""
    return (
        pb_grpc.PrefillServiceStub(grpc.insecure_channel(prefill_address)),
        pb_grpc.DecodeServiceStub(grpc.insecure_channel(decode_address)),
    )


def instance_stubs(*addresses: str) -> tuple[pb_grpc.InstanceServiceStub, ...]:
    """Blocking InstanceService stubs (Health, InstanceInfo), one per address."""
    return tuple(pb_grpc.InstanceServiceStub(grpc.insecure_channel(a)) for a in addresses)


def wait_idle(
    *stubs_: pb_grpc.InstanceServiceStub, timeout: float = 20.0
) -> list[pb.InstanceInfoResponse]:
    """InstanceInfo of each instance once none runs, waits for or leases anything and every
    block is free; raises with the last loads seen otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        infos = [s.InstanceInfo(pb.InstanceInfoRequest(), timeout=5) for s in stubs_]
        if all(_idle(i) for i in infos):
            return infos
        if time.monotonic() > deadline:
            raise AssertionError(f"instances not idle: {[str(i.load) for i in infos]}")
        time.sleep(0.1)


def _idle(info: pb.InstanceInfoResponse) -> bool:
    load = info.load
    return (
        load.num_requests_running == 0
        and load.num_requests_waiting == 0
        and load.num_leased_requests == 0
        and load.num_free_kv_blocks == info.num_kv_blocks
        and load.num_open_streams == 0
    )


def cancel_at_random(url: str, body: dict, num_requests: int, seed: int) -> None:
    """Stream ``num_requests`` completions at once and hang up on each at a random point:
    a client timeout of a few ms to 0.3 s (during prefill, the transfer or the first
    decode step), or after reading a few streamed lines."""
    rng = random.Random(seed)
    plans = [
        (rng.choice([0.005, 0.02, 0.1, 0.3, 30]), rng.randint(0, 6)) for _ in range(num_requests)
    ]

    def one(timeout: float, num_lines: int) -> None:
        try:
            with httpx.Client(timeout=timeout) as c:
                with c.stream("POST", url + "/v1/completions", json={**body, "stream": True}) as r:
                    for _, _ in zip(range(num_lines), r.iter_lines()):
                        pass
        except httpx.TimeoutException:
            pass

    threads = [threading.Thread(target=one, args=plan) for plan in plans]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


class Process:
    """A ``tandem ...`` child process with its log in a file; killed by ``stop()``."""

    def __init__(self, args: list[str], log_path: pathlib.Path, env: dict | None = None) -> None:
        self.log_path = log_path
        command = tandem_argv(*args)
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        full_env.pop("TANDEM_API_KEY", None)
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=full_env
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"process exited with {self.proc.returncode}:\n{self.log()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


class Launched(NamedTuple):
    proc: Process
    address: str
    role: str


def launch_instance(
    role: str, model_dir: pathlib.Path, transport: str, log_dir: pathlib.Path, *extra: str
) -> Launched:
    """Start a real ``tandem prefill|decode`` process. Launch several, then
    ``wait_serving`` each: they load side by side."""
    port = free_port()
    args = [role, str(model_dir), "--port", str(port), "--kv-transport", transport]
    for name, value in ENGINE_OPTIONS.items():
        args += ["--" + name.replace("_", "-"), str(value)]
    proc = Process([*args, *extra], log_dir / f"{role}-{port}.log")
    return Launched(proc, f"127.0.0.1:{port}", role)


def wait_serving(instance: Launched, timeout: float = 180.0) -> None:
    """Return once the instance answers Health as serving."""
    (stub,) = instance_stubs(instance.address)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        instance.proc.check_alive()
        try:
            if stub.Health(pb.HealthRequest(), timeout=2).serving:
                return
        except grpc.RpcError:
            time.sleep(0.25)
    instance.proc.stop()
    raise RuntimeError(f"{instance.address} not healthy:\n{instance.proc.log()}")


# What the test modules take in:
# ``model_dir, llm, pair, instances, instance_services = pd_helpers.FIXTURES``.
FIXTURES = (
    model_dir_fixture,
    llm_fixture,
    pair_fixture,
    instances_fixture,
    instance_services_fixture,
)
