"""Disaggregated serving across real processes and a real transport: ``tandem prefill`` and
``tandem decode`` moving KV over UCX (ucxx) here, over torch.distributed (gloo on CPU) in
test_pd_nccl.py (the same cases), behind a real ``tandem router``.

- Greedy answers through router -> prefill -> decode equal colocated ``LLM.generate`` for
  a concurrent batch, including prompts whose prefix the decode instance already holds.
- Requests cancelled at random points leave no request, lease or used block anywhere.
- The prefill process killed between its lease and the load: the request still completes
  under ``recompute``, and fails with an error naming the failed load under ``fail``.
- The decode process killed: the prefill instance frees the leased blocks once the lease
  expires.
"""

from __future__ import annotations

import concurrent.futures
import time
from typing import NamedTuple

import grpc
import httpx
import pd_helpers
import pytest
from api_server_process import ServerProcess
from pd_helpers import (
    Launched,
    cancel_at_random,
    instance_stubs,
    launch_instance,
    stubs,
    wait_idle,
    wait_serving,
)
from tandem.engine import SamplingParams
from tandem.proto import tandem_pb2 as pb
from tandem.services.pd.convert import generate_request_to_proto

pytestmark = pytest.mark.timeout(240)
model_dir, llm = pd_helpers.FIXTURES[:2]  # the tiny model and its colocated LLM

LEASE_SECONDS = 3.0
PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a kingdom by the sea, there lived a princess who loved maps. She",
    "Once upon a time, in a kingdom by the sea, there lived a princess who loved maps. He",
    "def fibonacci(n):",
]
GREEDY = {"temperature": 0, "max_tokens": 8}
FAST_FAIL = ("--kv-transfer-timeout", "5")  # a load from a dead prefill instance fails soon
# What test_pd_nccl.py takes.
__all__ = [
    "deployment_for",
    "llm",
    "model_dir",
    "test_concurrent_greedy_batch_equals_colocated",
    "test_cancelled_requests_leave_nothing_behind",
    "test_prefill_killed_mid_transfer",
    "test_decode_killed_lease_expires",
]


class Deployment(NamedTuple):
    transport: str
    prefill: str  # the router's prefill instance (leases of LEASE_SECONDS)
    decode: str  # the router's decode instance (policy recompute)
    router: ServerProcess
    spare_prefill: Launched  # killed by test_prefill_killed_mid_transfer
    fail_decode: Launched  # policy fail; killed by test_decode_killed_lease_expires


def deployment_for(transport: str):
    """The module fixture ``deployment`` over ``transport`` (test_pd_nccl.py takes the
    cases below with its own)."""

    @pytest.fixture(scope="module", name="deployment")
    def fixture(model_dir, tmp_path_factory):
        yield from _deployment(transport, model_dir, tmp_path_factory.mktemp(f"pd-{transport}"))

    return fixture


deployment = deployment_for("ucx")


def _deployment(transport: str, model_dir, logs):
    """Four instances and a router as real processes, all loading at once."""
    lease = ("--kv-lease-seconds", str(LEASE_SECONDS))
    fail = ("--kv-load-failure-policy", "fail", *FAST_FAIL)
    specs = [("prefill", lease), ("decode", FAST_FAIL), ("prefill", ()), ("decode", fail)]
    launched = [launch_instance(role, model_dir, transport, logs, *extra) for role, extra in specs]
    procs = [i.proc for i in launched]
    try:
        args = ["--prefill", launched[0].address, "--decode", launched[1].address]
        args += ["--remote-prefill-min-tokens", "1", "--enable-prompt-tokens-details"]
        router = ServerProcess(args, logs / "router.log", 180, "router")  # waits for its two
        procs.append(router)
        for instance in launched:
            wait_serving(instance)
        yield Deployment(transport, launched[0].address, launched[1].address, router, *launched[2:])
    finally:
        for proc in reversed(procs):
            proc.stop()


def test_concurrent_greedy_batch_equals_colocated(deployment, llm):
    prefill, decode, router = deployment.prefill, deployment.decode, deployment.router
    prompts = PROMPTS + PROMPTS[1:2]  # the repeat finds its prefix on the decode instance

    def ask(prompt: str) -> dict:
        body = {"prompt": prompt, **GREEDY}
        return httpx.post(router.url + "/v1/completions", json=body, timeout=60).json()

    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        bodies = list(pool.map(ask, prompts[:-1]))
    bodies.append(ask(prompts[-1]))
    expected = llm.generate(prompts, SamplingParams(**GREEDY), use_tqdm=False)
    assert [b["choices"][0]["text"] for b in bodies] == [e.outputs[0].text for e in expected]
    assert bodies[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] >= 16
    assert router.metric("tandem:kv_transfer_bytes_total") > 0
    wait_idle(*instance_stubs(prefill, decode))


def test_cancelled_requests_leave_nothing_behind(deployment):
    prefill, decode, router = deployment.prefill, deployment.decode, deployment.router
    body = {"prompt": PROMPTS[1], "temperature": 0, "max_tokens": 40, "ignore_eos": True}
    cancel_at_random(router.url, body, num_requests=8, seed=1)
    wait_idle(*instance_stubs(prefill, decode), timeout=LEASE_SECONDS + 15)


def _leased(prefill_stub, prompt_ids: list[int], request_id: str, max_tokens: int):
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    message = generate_request_to_proto(request_id, {"prompt_token_ids": prompt_ids}, params)
    first = prefill_stub.Prefill(message, timeout=30)
    assert first.HasField("kv_transfer_params")
    request = pb.DecodeRequest(request=message, kv_transfer_params=first.kv_transfer_params)
    request.output_token_ids.extend(first.output.outputs[0].token_ids)
    return request


def test_prefill_killed_mid_transfer(deployment, llm):
    """Blocks leased, prefill process gone before they moved: the load fails."""
    spare, fail_decode = deployment.spare_prefill, deployment.fail_decode
    ids = llm.get_tokenizer()(PROMPTS[1]).input_ids
    spare_stub, recompute_stub = stubs(spare.address, deployment.decode)
    recompute_request = _leased(spare_stub, ids, "kill-recompute", 8)
    fail_request = _leased(spare_stub, ids, "kill-fail", 8)
    spare.proc.proc.kill()
    spare.proc.proc.wait()
    deltas = list(recompute_stub.Decode(recompute_request, timeout=60))
    want = llm.generate(PROMPTS[1], SamplingParams(**GREEDY), use_tqdm=False)[0]
    assert [t for d in deltas for t in d.outputs[0].token_ids] == want.outputs[0].token_ids
    failed = list(stubs(spare.address, fail_decode.address)[1].Decode(fail_request, timeout=60))
    assert "loading its KV from the prefill instance failed" in failed[-1].error
    assert failed[-1].outputs[0].finish_reason == pb.FINISH_REASON_ABORT


def test_decode_killed_lease_expires(deployment, llm):
    """Blocks leased, decode process gone before it took them: the lease expires."""
    prefill_stub, decode_stub = stubs(deployment.prefill, deployment.fail_decode.address)
    (prefill_instance,) = instance_stubs(deployment.prefill)
    ids = llm.get_tokenizer()(PROMPTS[3]).input_ids
    request = _leased(prefill_stub, ids, "orphaned", 8)
    start = time.monotonic()
    assert prefill_instance.InstanceInfo(pb.InstanceInfoRequest()).load.num_leased_requests >= 1
    deployment.fail_decode.proc.proc.kill()
    deployment.fail_decode.proc.proc.wait()
    with pytest.raises(grpc.RpcError):
        list(decode_stub.Decode(request, timeout=5))
    wait_idle(prefill_instance, timeout=LEASE_SECONDS + 10)
    assert time.monotonic() - start >= LEASE_SECONDS * 0.8  # freed by expiry, not before
