"""Prefill and decode in two real processes, KV moved by a real transport (test bodies).

``test_kvtransfer_ucx.py`` and ``test_kvtransfer_nccl.py`` import these tests and set
the ``transport`` fixture. The prefill engine runs in a child process
(``kv_prefill_process.py``); the decode engines run in the test process. The model is a
tiny random llama saved into a temporary folder (prompts are token ids below its vocab,
so the default model's tokenizer stands in for one).
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from tandem.engine import SamplingParams
from tandem.engine.llm import LLM
from tandem.engine.llm_engine import LLMEngine

__all__ = [  # what each transport's test module runs
    "decode", "expected", "model_dir", "prefill",
    "test_decode_side_loads_only_blocks_it_lacks",
    "test_layout_mismatch_is_refused_naming_the_field",
    "test_malformed_messages_do_not_kill_the_listener",
    "test_prefill_killed_mid_transfer",
    "test_prefill_then_decode_equals_colocated",
    "test_unknown_lease_is_refused_and_recomputed",
    "test_idle_after_transfers_uses_under_5_percent_of_a_core",
]  # fmt: skip

HERE = pathlib.Path(__file__).resolve().parent
BLOCK = 16
MAX_TOKENS = 8


def make_prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(3)

    def rand(n: int) -> list[int]:
        return torch.randint(3, 1000, (n,), generator=gen).tolist()

    prefix = rand(40)
    # The last one is only for the prefix test: nothing else warms the decode cache with it.
    return [rand(5), rand(37), prefix + rand(9), prefix + rand(21), rand(70), rand(37)]


class PrefillProcess:
    def __init__(self, model: str, tokenizer: str, transport: str, *extra: str) -> None:
        cmd = [sys.executable, str(HERE / "kv_prefill_process.py"), model, tokenizer, transport]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [*cmd, *extra], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        ready = self._reply()
        self.host, self.port = ready["address"]
        self.layout = ready["layout"]

    def call(self, **command) -> dict:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def _reply(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("@kv-test "):
                return json.loads(line.removeprefix("@kv-test "))
        raise RuntimeError(f"the prefill process exited ({self.proc.wait()})")

    def prefill(self, rid: str, prompt: list[int]) -> dict:
        return self.call(op="prefill", rid=rid, prompt_token_ids=prompt)

    def wait_idle(self, timeout: float = 15.0) -> dict:
        """Stats once every lease has ended (the decode side's DONE arrives async)."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.call(op="stats")
            if stats["num_leased"] == 0 or time.monotonic() > deadline:
                return stats
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path, safe_serialization=True)
    return str(path)


def _llm(model_dir: str, tokenizer, **options) -> LLM:
    common = dict(tokenizer=str(tokenizer), dtype="float32", kv_cache_memory="16MiB")
    return LLM(model_dir, **{**common, **options})


@pytest.fixture(scope="module")
def prefill(model_dir, default_model_dir, transport):
    process = PrefillProcess(model_dir, str(default_model_dir), transport)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def decode(model_dir, default_model_dir, transport) -> LLMEngine:
    return _llm(model_dir, default_model_dir, role="decode", kv_connector=transport).engine


@pytest.fixture(scope="module")
def expected(model_dir, default_model_dir) -> list[list[int]]:
    llm = _llm(model_dir, default_model_dir)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in make_prompts()]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


def add_decode(engine: LLMEngine, rid: str, prompt: list[int], first: dict) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    engine.add_request(
        rid,
        {"prompt_token_ids": prompt},
        params,
        output_token_ids=first["token_ids"],
        kv_transfer_params=first["params"],
    )


def run(engine: LLMEngine, timeout: float = 30.0) -> dict:
    """Step until idle; the finished outputs by request id."""
    finished, deadline = {}, time.monotonic() + timeout
    while engine.scheduler.has_work():
        assert time.monotonic() < deadline, "the decode engine did not finish"
        finished.update({o.request_id: o for o in engine.step() if o.finished})
        if not engine.scheduler.running and not engine.scheduler.waiting:
            time.sleep(0.001)  # only loads in flight: leave the core to the transfer
    return finished


def assert_idle(engine: LLMEngine) -> None:
    kv = engine.scheduler.kv
    kv.check_integrity()
    assert kv.pool.num_free_blocks == kv.pool.num_blocks and not engine.scheduler.leased


def assert_prefill_idle(prefill: PrefillProcess) -> None:
    stats = prefill.wait_idle()
    assert stats["num_leased"] == 0 and stats["num_free_blocks"] == stats["num_blocks"], stats


def test_prefill_then_decode_equals_colocated(prefill, decode, expected, transport):
    prompts = make_prompts()[:5]
    firsts = [prefill.prefill(f"{transport}-{i}", p) for i, p in enumerate(prompts)]
    for i, (prompt, first) in enumerate(zip(prompts, firsts)):
        assert first["token_ids"] == expected[i][:1]
        assert first["params"]["remote_port"] == prefill.port
        add_decode(decode, f"{transport}-{i}", prompt, first)  # all loads run concurrently
    finished = run(decode)
    for i in range(len(prompts)):
        assert finished[f"{transport}-{i}"].outputs[0].token_ids == expected[i], i
    records = decode.runner.connector.drain_transfer_records()
    assert len(records) == len(prompts) and all(r.ok and r.num_bytes > 0 for r in records)
    assert_idle(decode)
    assert_prefill_idle(prefill)


def test_decode_side_loads_only_blocks_it_lacks(prefill, decode, expected, transport):
    prompt = make_prompts()[5]  # 37 tokens: blocks 0 and 1 full, block 2 partial
    for attempt in ("cold", "warm"):
        rid = f"{transport}-{attempt}"
        add_decode(decode, rid, prompt, prefill.prefill(rid, prompt))
        assert run(decode)[rid].outputs[0].token_ids == expected[5]
    cold, warm = decode.runner.connector.drain_transfer_records()
    block_bytes = decode.runner.kv_cache[0].nbytes
    assert (cold.num_bytes, warm.num_bytes) == (3 * block_bytes, block_bytes)
    assert_idle(decode)
    assert_prefill_idle(prefill)


def _cpu_seconds(pid: int | str = "self") -> float:
    """User plus system CPU time of a process so far (all its threads)."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_idle_after_transfers_uses_under_5_percent_of_a_core(prefill, decode, expected, transport):
    """ucxx's blocking progress once spun a core per process after the first transfer."""
    prompt = make_prompts()[1]
    for attempt in range(2):  # two transfers, so the worker has been woken and re-armed
        rid = f"{transport}-idle-{attempt}"
        add_decode(decode, rid, prompt, prefill.prefill(rid, prompt))
        assert run(decode)[rid].outputs[0].token_ids == expected[1]
    assert_prefill_idle(prefill)
    time.sleep(1.0)  # OpenMP workers stop spinning
    pids = {"decode (this process)": "self", "prefill": prefill.proc.pid}
    before = {name: _cpu_seconds(pid) for name, pid in pids.items()}
    window = 10.0
    time.sleep(window)
    share = {name: (_cpu_seconds(pid) - before[name]) / window for name, pid in pids.items()}
    print(f"{transport}: idle CPU share of one core over {window:g} s: {share}")
    assert all(value < 0.05 for value in share.values()), share


def test_unknown_lease_is_refused_and_recomputed(prefill, decode, expected, transport):
    prompt = make_prompts()[0]
    first = prefill.prefill(f"{transport}-real", prompt)
    bogus = {**first, "params": {**first["params"], "remote_request_id": "never-leased"}}
    add_decode(decode, "bogus", prompt, bogus)
    assert run(decode)["bogus"].outputs[0].token_ids == expected[0]  # recomputed locally
    (record,) = decode.runner.connector.drain_transfer_records()
    assert not record.ok and "holds no lease" in record.error
    add_decode(decode, f"{transport}-real", prompt, first)  # the real lease still works
    assert run(decode)[f"{transport}-real"].outputs[0].token_ids == expected[0]
    assert decode.runner.connector.drain_transfer_records()[0].ok
    assert_idle(decode)
    assert_prefill_idle(prefill)


def _send_raw(host: str, port: int, data: bytes) -> bytes:
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        try:
            while chunk := sock.recv(4096):
                chunks.append(chunk)
        except ConnectionResetError:
            pass  # it hung up with our unread bytes still queued
    return b"".join(chunks)


def test_malformed_messages_do_not_kill_the_listener(prefill, decode, expected, transport):
    from tandem.kvtransfer.wire import HEADER, MAGIC, MsgType

    host, port = prefill.host, prefill.port
    garbage = [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        HEADER.pack(MAGIC, 1, MsgType.HELLO, 0, 1 << 30),  # absurd length
        HEADER.pack(MAGIC, 1, MsgType.HELLO, 0, 64) + b"\x00\x05ab",  # truncated payload
        HEADER.pack(MAGIC, 1, MsgType.READ, 0, 4) + b"\xff" * 4,  # READ before HELLO
        os.urandom(4096),
    ]
    for data in garbage:
        reply = _send_raw(host, port, data)
        assert reply == b"" or reply.startswith(MAGIC)  # a REFUSE, or just hung up
    prompt = make_prompts()[2]
    rid = f"{transport}-after-garbage"
    add_decode(decode, rid, prompt, prefill.prefill(rid, prompt))
    assert run(decode)[rid].outputs[0].token_ids == expected[2]
    assert decode.runner.connector.drain_transfer_records()[0].ok
    assert_prefill_idle(prefill)


def test_layout_mismatch_is_refused_naming_the_field(
    prefill, model_dir, default_model_dir, transport
):
    other = _llm(
        model_dir, default_model_dir, role="decode", kv_connector=transport,
        block_size=2 * BLOCK, kv_load_failure_policy="fail",
    ).engine  # fmt: skip
    prompt = make_prompts()[1]
    add_decode(other, "mismatch", prompt, prefill.prefill(f"{transport}-mismatch", prompt))
    out = run(other)["mismatch"]
    assert out.finished and not out.outputs[0].token_ids[1:]
    assert "block_size" in out.metrics["error"], out.metrics
    assert_idle(other)
    other.runner.connector.close()
    # Nobody took the blocks: the prefill side frees them when the lease (5 s) expires.
    assert prefill.call(op="stats")["num_leased"] == 1
    assert_prefill_idle(prefill)


def _waiting_for_data(engine: LLMEngine) -> bool:
    """A load of this engine sent its READ and waits for blocks (peeking at the loader)."""
    for task in list(engine.runner.connector.loader._peers.values()):
        if task.done() and not task.cancelled() and task.exception() is None:
            if task.result().pending:
                return True
    return False


def test_prefill_killed_mid_transfer(model_dir, default_model_dir, expected, transport):
    slow = PrefillProcess(model_dir, str(default_model_dir), transport, "--slow-send", "30")
    engines = {
        policy: _llm(
            model_dir,
            default_model_dir,
            role="decode",
            kv_connector=transport,
            kv_load_failure_policy=policy,
        ).engine  # fmt: skip
        for policy in ("recompute", "fail")
    }
    try:
        prompt = make_prompts()[3]
        for policy, engine in engines.items():
            add_decode(engine, policy, prompt, slow.prefill(f"{transport}-{policy}", prompt))
        # A request cancelled mid-load keeps its blocks until the load ends.
        recompute = engines["recompute"]
        add_decode(recompute, "cancelled", prompt, slow.prefill(f"{transport}-cancel", prompt))
        for engine in engines.values():
            engine.step()  # starts the loads
        deadline = time.monotonic() + 20
        while not all(map(_waiting_for_data, engines.values())):
            assert time.monotonic() < deadline, "the loads never reached the data phase"
            time.sleep(0.02)  # the loads connected and asked for their blocks ...
        recompute.abort_request("cancelled")
        assert "cancelled" in recompute.scheduler.leased  # its load still points at them
        os.kill(slow.proc.pid, signal.SIGKILL)  # ... and the prefill dies before sending
        recomputed = run(recompute)["recompute"]
        assert recomputed.outputs[0].token_ids == expected[3]
        failed = run(engines["fail"])["fail"]
        assert "failed" in failed.metrics["error"] and not failed.outputs[0].token_ids[1:]
        for engine in engines.values():
            assert_idle(engine)
    finally:
        slow.stop()
        for engine in engines.values():
            engine.runner.connector.close()
