"""``tandem router`` end to end: a real router process in front of a prefill and a decode
service (both in this process, KV moved by the loopback connector), driven over HTTP as
``tandem serve`` is. Answers must equal colocated ``LLM.generate``; cancelled requests
must leave both instances idle; the request id must cross both hops; the KV-transfer
metrics must show up; incompatible instances must stop the router at start-up.
"""

from __future__ import annotations

import concurrent.futures
import json
import time

import grpc
import httpx
import openai
import pd_helpers
import pytest
from api_server_process import ServerProcess
from pd_helpers import InProcessPair, cancel_at_random, wait_idle
from tandem.engine import SamplingParams
from tandem.proto import tandem_pb2 as pb

pytestmark = pytest.mark.timeout(180)
# The tiny model, its LLM, the in-process pair, its role stubs and InstanceService stubs.
model_dir, llm, pair, instances, instance_services = pd_helpers.FIXTURES

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "List three colors:",
    "Once upon a time, in a kingdom by the sea, there lived a princess who loved maps. She",
]
GREEDY = {"temperature": 0, "max_tokens": 10}


@pytest.fixture(scope="module")
def router(pair, tmp_path_factory):
    args = ["--prefill", pair.prefill_address, "--decode", pair.decode_address]
    args += ["--remote-prefill-min-tokens", "4", "--served-model-name", "tiny"]
    args += ["--enable-prompt-tokens-details"]
    log = tmp_path_factory.mktemp("router") / "router.log"
    proc = ServerProcess(args, log, timeout=120, command_name="router")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def http(router):
    with httpx.Client(base_url=router.url, timeout=60) as c:
        yield c


def complete(http: httpx.Client, prompt, **fields) -> dict:
    response = http.post("/v1/completions", json={"prompt": prompt, **GREEDY, **fields})
    assert response.status_code == 200, response.text
    return response.json()


def test_models_health_and_the_openai_client(router, llm):
    client = openai.OpenAI(base_url=router.url + "/v1", api_key="none", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    got = client.completions.create(model="tiny", prompt=PROMPTS[0], **GREEDY).choices[0].text
    assert (
        got == llm.generate(PROMPTS[0], SamplingParams(**GREEDY), use_tqdm=False)[0].outputs[0].text
    )


def test_concurrent_greedy_batch_equals_colocated(http, llm, instance_services):
    stops = [None, None, [" "], None]  # one request ends on a stop string
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        bodies = list(pool.map(lambda a: complete(http, a[0], stop=a[1]), zip(PROMPTS, stops)))
    for prompt, stop, body in zip(PROMPTS, stops, bodies):
        want = llm.generate(prompt, SamplingParams(**GREEDY, stop=stop), use_tqdm=False)[0]
        assert body["choices"][0]["text"] == want.outputs[0].text
        assert body["choices"][0]["finish_reason"] == want.outputs[0].finish_reason
        assert body["usage"]["completion_tokens"] == len(want.outputs[0].token_ids)
    wait_idle(*instance_services)


def test_prefix_held_by_the_decode_instance(http, llm, instance_services):
    prompt = PROMPTS[3] + " and" * 20  # several full blocks
    first, second = complete(http, prompt), complete(http, prompt)
    want = llm.generate(prompt, SamplingParams(**GREEDY), use_tqdm=False)[0].outputs[0].text
    assert first["choices"][0]["text"] == second["choices"][0]["text"] == want
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] >= 16
    wait_idle(*instance_services)


def test_streaming_chat_equals_whole_chat(http, llm):
    body = {"messages": [{"role": "user", "content": "Name a fruit."}], **GREEDY}
    whole = http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1]]
    want = llm.chat([body["messages"]], SamplingParams(**GREEDY), use_tqdm=False)[0]
    assert "".join(chunks) == whole == want.outputs[0].text


def prefill_lookups(instance_services) -> int:
    """Prefix-cache lookups on the prefill instance: it grows with every prompt it runs."""
    return instance_services[0].InstanceInfo(pb.InstanceInfoRequest()).load.prefix_cache_queries


def test_requests_the_decode_instance_runs_alone(http, llm, instance_services):
    """Short prompts and several samples skip the prefill hop, same answers."""
    before = prefill_lookups(instance_services)
    short = complete(http, "Hi")["choices"][0]["text"]
    assert short == llm.generate("Hi", SamplingParams(**GREEDY), use_tqdm=False)[0].outputs[0].text
    two = complete(http, PROMPTS[1], n=2)["choices"]
    want = llm.generate(PROMPTS[1], SamplingParams(**GREEDY), use_tqdm=False)[0].outputs[0].text
    assert [c["text"] for c in two] == [want, want]
    assert prefill_lookups(instance_services) == before  # the prefill instance never saw them


def test_logprobs_take_the_split_path_and_equal_colocated(http, llm, instance_services):
    """The first token's logprobs cross from the prefill to the decode instance: one
    position per token, each as colocated computes it."""
    before = prefill_lookups(instance_services)
    got = complete(http, PROMPTS[3], logprobs=2)["choices"][0]
    assert prefill_lookups(instance_services) > before  # the prefill instance ran it
    params = SamplingParams(**GREEDY, logprobs=2)
    want = llm.generate(PROMPTS[3], params, use_tqdm=False)[0].outputs[0]
    chosen = [position[t] for t, position in zip(want.token_ids, want.logprobs)]
    assert got["text"] == want.text
    assert got["logprobs"]["tokens"] == [lp.decoded_token for lp in chosen]
    assert len(got["logprobs"]["tokens"]) == len(want.token_ids) == GREEDY["max_tokens"]
    assert got["logprobs"]["token_logprobs"] == pytest.approx(
        [lp.logprob for lp in chosen], abs=1e-4
    )
    for top, position in zip(got["logprobs"]["top_logprobs"], want.logprobs):
        wanted = {lp.decoded_token: lp.logprob for lp in position.values()}
        assert top.keys() == wanted.keys()
        assert top == pytest.approx(wanted, abs=1e-4)
    wait_idle(*instance_services)


def test_request_id_crosses_both_hops(http, pair):
    """The client's X-Request-Id is the engine request id on the prefill and decode side."""
    seen: list[tuple[str, str]] = []
    engines = {"prefill": pair.prefill_llm, "decode": pair.decode_llm}
    for role, engine in engines.items():

        def spy(prompt, params, request_id, _role=role, _generate=engine.generate, **kwargs):
            seen.append((_role, request_id))
            return _generate(prompt, params, request_id, **kwargs)

        engine.generate = spy  # an instance attribute: the servicers call this one
    try:
        body = {"prompt": PROMPTS[3], **GREEDY}
        response = http.post("/v1/completions", json=body, headers={"X-Request-Id": "carried-7"})
    finally:
        for engine in engines.values():
            del engine.generate
    assert response.status_code == 200 and response.headers["x-request-id"] == "carried-7"
    assert response.json()["id"] == "cmpl-carried-7"
    assert seen == [("prefill", "carried-7"), ("decode", "carried-7")]


def test_cancelled_requests_leave_no_request_or_block(router, instance_services):
    body = {"prompt": PROMPTS[3], "temperature": 0, "max_tokens": 60, "ignore_eos": True}
    cancel_at_random(router.url, body, num_requests=8, seed=0)
    wait_idle(*instance_services)
    assert router.metric("tandem:request_success_total", finished_reason="abort") >= 1


def test_bad_requests_and_metrics(router, http):
    bad = http.post("/v1/completions", json={"prompt": PROMPTS[0], "top_p": 2})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "top_p"
    long = http.post("/v1/completions", json={"prompt": "a " * 400, "max_tokens": 4})
    assert long.status_code == 400
    complete(http, PROMPTS[3])
    assert router.metric("tandem:kv_transfer_seconds_count") >= 1
    assert router.metric("tandem:kv_transfer_bytes_total") > 0
    assert router.metric("tandem:time_to_first_token_seconds_count") >= 1
    # The gauge is the instances' load as of the router's last poll (every 0.5 s).
    deadline = time.monotonic() + 5
    while router.metric("tandem:num_requests_running") != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert router.metric("tandem:num_requests_running") == 0


def test_incompatible_instances_stop_the_router(model_dir, pair, tmp_path):
    other = InProcessPair(model_dir, block_size=32)
    try:
        args = ["--prefill", pair.prefill_address, "--decode", other.decode_address]
        with pytest.raises(
            RuntimeError,
            match=r"block_size: prefill instance .* has 16 but decode instance .* has 32",
        ):
            ServerProcess(args, tmp_path / "router.log", timeout=60, command_name="router")
    finally:
        other.close()


def test_up_builds_child_commands_that_parse():
    """``tandem up``'s children get the flags it was given, and their command lines parse."""
    from tandem.services.cli import build_parser, engine_options
    from tandem.services.launch import tandem_argv
    from tandem.services.pd.server import instance_config
    from tandem.services.router.config import router_config
    from tandem.services.up import child_commands

    argv = ["up", "some/model", "--prefill", "2", "--port", "9000", "--block-size", "32"]
    argv += ["--kv-transport", "nccl", "--remote-prefill-min-tokens", "8", "--api-key", "k"]
    children = dict(child_commands(build_parser().parse_args(argv)))
    assert sorted(children) == ["decode-0", "prefill-0", "prefill-1", "router"]
    prefix = len(tandem_argv())  # the interpreter and its flags
    parsed = {name: build_parser().parse_args(cmd[prefix:]) for name, cmd in children.items()}
    router = parsed["router"]
    assert (router.command, router.model, router.port, router.api_key) == (
        "router",
        "some/model",
        9000,
        "k",
    )
    config = router_config(router)
    assert config.remote_prefill_min_tokens == 8 and len(config.prefill.split(",")) == 2
    decode_port = instance_config(parsed["decode-0"]).port
    assert config.decode == f"127.0.0.1:{decode_port}"
    for name in ("prefill-0", "decode-0"):
        assert instance_config(parsed[name]).kv_transport == "nccl"
        assert engine_options(parsed[name]) == {"model": "some/model", "block_size": 32}


@pytest.mark.parametrize(
    ("code", "details", "kind"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, "top_p must be in (0, 1]", ValueError),
        (grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses", "unavailable"),
        (grpc.StatusCode.UNAVAILABLE, "instance is draining (SIGTERM)", "unavailable"),
        (grpc.StatusCode.UNAVAILABLE, "the engine was dead: RuntimeError()", "unavailable"),
        # lost mid-call: the request may be what killed it, so it is not sent elsewhere
        (grpc.StatusCode.UNAVAILABLE, "Socket closed", "failure"),
        (grpc.StatusCode.UNAVAILABLE, "recvmsg:Connection reset by peer", "failure"),
        (grpc.StatusCode.INTERNAL, "the engine died while running this request", "failure"),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", "failure"),
    ],
)
def test_instance_errors_split_into_refused_unreachable_and_failed(code, details, kind):
    from tandem.services.api_server.engine_client import EngineUnavailableError
    from tandem.services.router.instances import Instance
    from tandem.services.router.remote import RemoteFailure, _api_error

    instance = Instance("127.0.0.1:1", "prefill", None, None, None, healthy=True)
    error = _api_error(instance, grpc.aio.AioRpcError(code, None, None, details))
    expected = {"unavailable": EngineUnavailableError, "failure": RemoteFailure}.get(kind, kind)
    assert type(error) is expected
    # unreachable or lost: skipped until a poll finds it serving again
    assert instance.healthy == (
        code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL)
    )
