"""``tandem serve`` end to end: a real server process on the default model, driven by the
official ``openai`` client (and httpx for what the client hides: headers, raw SSE, sizes).

One server (with ``--api-key``) serves every test but the SIGTERM one, which starts its
own short-lived server.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import socket
import threading
import time

import httpx
import openai
import pytest
from api_server_process import ServerProcess
from tandem.engine import LLM, SamplingParams

pytestmark = pytest.mark.timeout(600)

API_KEY = "sk-test-123"
MAX_MODEL_LEN = 512
BODY_LIMIT = 32 * 1024
BODY_TIMEOUT = 2.0
ENGINE_ARGS = ["--kv-cache-memory", "256MiB", "--max-model-len", str(MAX_MODEL_LEN)]
PROMPTS = ["The capital of France is", "def fibonacci(n):", "List three colors:"]
CHATS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit."}],
]
MODEL = "SmolLM2-135M-Instruct"
GREEDY = {"temperature": 0, "max_tokens": 10}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    args = [*ENGINE_ARGS, "--api-key", API_KEY, "--max-request-body-bytes", str(BODY_LIMIT),
            "--body-read-timeout", str(BODY_TIMEOUT), "--enable-prompt-tokens-details"]  # fmt: skip
    proc = ServerProcess(args, log)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120
    ) as c:
        yield c


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(kv_cache_memory="128MiB", max_model_len=MAX_MODEL_LEN)


def sse_events(response: httpx.Response) -> list[str]:
    return [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]


def test_models_version_health(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server.url + "/health").status_code == 200  # open without the key
    assert httpx.get(server.url + "/version").json()["version"]


def test_greedy_completions_equal_llm_generate(client, llm):
    def ask(prompt: str) -> str:
        return client.completions.create(model=MODEL, prompt=prompt, **GREEDY).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:  # batched server-side
        served = list(pool.map(ask, PROMPTS))
    offline = llm.generate(PROMPTS, SamplingParams(**GREEDY), use_tqdm=False)
    assert served == [o.outputs[0].text for o in offline]
    assert all(served)


def test_greedy_chat_equals_llm_chat(client, llm):
    served = [
        client.chat.completions.create(model=MODEL, messages=m, **GREEDY).choices[0].message.content
        for m in CHATS
    ]
    offline = llm.chat(CHATS, SamplingParams(**GREEDY), use_tqdm=False)
    assert served == [o.outputs[0].text for o in offline]


def test_token_id_prompts_and_prompt_lists(client, http):
    ids = [http.post("/tokenize", json={"prompt": p}).json()["tokens"] for p in PROMPTS[:2]]
    assert http.post("/detokenize", json={"tokens": ids[0]}).json()["prompt"] == PROMPTS[0]
    by_text = client.completions.create(model=MODEL, prompt=PROMPTS[0], **GREEDY)
    by_ids = client.completions.create(model=MODEL, prompt=ids, **GREEDY)
    assert [c.index for c in by_ids.choices] == [0, 1]
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids[0]) + len(ids[1])


def test_streaming_with_usage(client):
    full = client.completions.create(model=MODEL, prompt=PROMPTS[1], **GREEDY)
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=PROMPTS[1],
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"

    stream = client.chat.completions.create(
        model=MODEL,
        messages=CHATS[0],
        stream=True,
        stream_options={"include_usage": True},
        **GREEDY,
    )
    chat_chunks = list(stream)
    assert chat_chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chat_chunks if c.choices)
    whole = client.chat.completions.create(model=MODEL, messages=CHATS[0], **GREEDY)
    assert content == whole.choices[0].message.content
    assert chat_chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_usage_reports_cached_prompt_tokens(client):
    prompt = "Tandem caches KV blocks of repeated prompts. " * 8  # several full blocks
    first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2)
    second = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert 16 <= cached < second.usage.prompt_tokens


def test_n_samples(client, http):
    out = client.completions.create(model=MODEL, prompt=PROMPTS[2], n=2, seed=1, max_tokens=6)
    assert sorted(c.index for c in out.choices) == [0, 1] and out.usage.completion_tokens == 12
    chat = client.chat.completions.create(model=MODEL, messages=CHATS[1], n=2, max_tokens=6)
    assert sorted(c.index for c in chat.choices) == [0, 1]
    body = {"messages": CHATS[1], "n": 2, "max_tokens": 6, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        events = [json.loads(e) for e in sse_events(response)[:-1]]
    finishes = [c["index"] for e in events for c in e["choices"] if c["finish_reason"]]
    assert sorted(finishes) == [0, 1]  # each choice finishes exactly once


def test_logprobs(client):
    out = client.completions.create(model=MODEL, prompt=PROMPTS[0], logprobs=3, **GREEDY)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 10
    assert "".join(lp.tokens) == out.choices[0].text
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) >= 3 and logprob <= 0 and top[token] == max(top.values())  # greedy
    chat = client.chat.completions.create(
        model=MODEL, messages=CHATS[0], logprobs=True, top_logprobs=2, **GREEDY
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.token == entry.top_logprobs[0].token


def test_stop_strings(client):
    text = client.completions.create(model=MODEL, prompt=PROMPTS[0], **GREEDY).choices[0].text
    stop = text.split()[1]  # the second word
    out = client.completions.create(model=MODEL, prompt=PROMPTS[0], stop=[stop], **GREEDY)
    assert out.choices[0].text == text[: text.index(stop)]
    assert out.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x", "temperature": "hot"}, "temperature"),
        ({"prompt": "x", "top_p": 2.0}, "top_p"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "hello " * MAX_MODEL_LEN}, "prompt"),
        ({"prompt": "x", "max_tokens": MAX_MODEL_LEN}, "max_tokens"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": [[]]}, "prompt"),
        ({"prompt": [10**9]}, "prompt_token_ids"),
        ({"prompt": "x", "n": 1000}, "n"),
        ({"prompt": "x", "logprobs": 1000}, "logprobs"),
        ({"prompt": "x", "echo": True}, "echo"),
        ({"prompt": ["x", [1, 2]]}, "prompt"),
    ],
)
def test_bad_completion_requests_get_400(http, body, param):
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert error["message"] and "code" in error


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": "hi " * MAX_MODEL_LEN}]}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
        (
            {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 99},
            "top_logprobs",
        ),
        ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}, None),
    ],
)
def test_bad_chat_requests_get_400(client, body, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, **body)
    assert info.value.status_code == 400
    if param is not None:
        assert info.value.param == param


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (b'{"prompt": "x\\ud800y"}', "prompt"),  # a lone surrogate
        (b'{"prompt": ["ok", "\\udfff"]}', "prompt.1"),
        (b'{"prompt": "x", "temperature": Infinity}', "temperature"),
        (b'{"prompt": "x", "temperature": NaN}', "temperature"),
        (b'{"prompt": "x", "top_p": 1e400}', "top_p"),  # parses as inf
        (b'{"prompt": "x", "temperature": 1e300}', "temperature"),
        (b'{"prompt": "x", "repetition_penalty": 1e300}', "repetition_penalty"),
        (b'{"prompt": "x", "seed": 18446744073709551616}', "seed"),
        (b'{"prompt": "x", "seed": 9223372036854775806, "n": 4}', "seed"),
        (b'{"prompt": "x", "top_k": 9223372036854775808}', "top_k"),
        (b'{"prompt": "x", "stop_token_ids": [99999999], "min_tokens": 2}', "stop_token_ids"),
        (b'{"prompt": "x", "prompt_logprobs": 2, "stream": true}', "prompt_logprobs"),
        (b'{"prompt": "x", "prompt_logprobs": -1}', "prompt_logprobs"),
        (b'{"prompt": "x", "cache_salt": "' + b"s" * 300 + b'"}', "cache_salt"),
        (b'{"messages": [{"role": "hacker", "content": "hi"}]}', "messages.0.role"),
        (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages.0.content"),
    ],
)
def test_values_that_used_to_kill_or_crash_get_400(http, server, raw, param):
    path = "/v1/chat/completions" if b"messages" in raw else "/v1/completions"
    response = http.post(path, content=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    assert httpx.get(server.url + "/health").status_code == 200
    ok = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
    assert ok.status_code == 200, ok.text


def test_prompt_logprobs_match_the_engine(http, llm):
    body = {"prompt": PROMPTS[0], "max_tokens": 1, "temperature": 0, "prompt_logprobs": 2}
    served = http.post("/v1/completions", json=body).json()["choices"][0]["prompt_logprobs"]
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=2)
    offline = llm.generate(PROMPTS[0], params, use_tqdm=False)[0].prompt_logprobs
    assert served[0] is None and offline[0] is None
    assert len(served) == len(offline) == len(llm.get_tokenizer()(PROMPTS[0]).input_ids)
    for mine, theirs in zip(served[1:], offline[1:]):
        assert {int(k) for k in mine} == set(theirs)
        for token_id, entry in theirs.items():
            assert mine[str(token_id)]["logprob"] == pytest.approx(entry.logprob, abs=1e-4)
            assert mine[str(token_id)]["rank"] == entry.rank
    chat = {"messages": CHATS[0], "max_tokens": 1, "prompt_logprobs": 0}
    positions = http.post("/v1/chat/completions", json=chat).json()["prompt_logprobs"]
    assert positions[0] is None and all(len(p) == 1 for p in positions[1:])  # the token itself


def test_a_body_shorter_than_its_length_times_out_with_408(server):
    host, port = server.url.removeprefix("http://").split(":")
    head = (
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {API_KEY}\r\nContent-Length: 100\r\n\r\n"
    )
    with socket.create_connection((host, int(port)), timeout=BODY_TIMEOUT + 10) as sock:
        sock.sendall(head.encode() + b'{"prompt": ')
        start = time.monotonic()
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
    assert time.monotonic() - start < BODY_TIMEOUT + 5
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"


def test_unknown_fields_are_ignored_as_in_vllm(http):
    body = {"prompt": "x", "max_tokens": 2, "some_future_field": {"a": 1}}
    assert http.post("/v1/completions", json=body).status_code == 200


def test_auth_model_and_size_errors(client, server, http):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        response = httpx.post(server.url + "/v1/completions", json={"prompt": "x"}, headers=headers)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/v1/models").status_code == 401
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    assert info.value.code == "model_not_found"
    response = http.post("/v1/completions", content=b'{"prompt": "' + b"x" * BODY_LIMIT + b'"}')
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    for size in (70_000, 200_000):  # one read or several: the same limit, the same answer
        response = http.post("/v1/completions", headers={"X-Big": "y" * size}, json={})
        assert response.status_code == 431, response.text
        assert response.json()["error"]["code"] == "request_header_fields_too_large"


def test_request_id_is_accepted_or_generated(http):
    body = {"prompt": "x", "max_tokens": 2}
    given = http.post("/v1/completions", json=body, headers={"X-Request-Id": "client-id-7"})
    assert given.headers["x-request-id"] == "client-id-7"
    assert given.json()["id"] == "cmpl-client-id-7"
    generated = http.post("/v1/completions", json=body)
    assert generated.json()["id"] == "cmpl-" + generated.headers["x-request-id"]


def test_disconnect_aborts_and_frees_blocks_while_health_stays_fast(server, http):
    aborted_before = server.metric("tandem:request_success_total", finished_reason="abort")
    body = {"prompt": PROMPTS[0], "max_tokens": 400, "ignore_eos": True, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as response:
        # Keep the iterator alive: breaking out of a for loop over it closes the generator,
        # and httpx then closes the connection (the disconnect this test makes on purpose
        # only when the with block ends).
        lines = response.iter_lines()
        for _ in range(6):
            next(lines)
        assert server.metric("tandem:num_requests_running") == 1
        assert server.metric("tandem:kv_cache_usage_perc") > 0
        start = time.monotonic()
        assert httpx.get(server.url + "/health", timeout=5).status_code == 200
        assert time.monotonic() - start < 2.0, "a busy engine stalled /health"
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if server.metric("tandem:num_requests_running") == 0:
            break
        time.sleep(0.1)
    assert server.metric("tandem:num_requests_running") == 0
    assert server.metric("tandem:num_requests_waiting") == 0
    assert server.metric("tandem:kv_cache_usage_perc") == 0  # cached free blocks count free
    after = server.metric("tandem:request_success_total", finished_reason="abort")
    assert after == aborted_before + 1


def test_metrics_cover_vllms_set(server, client):
    client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=3)
    for name in (
        "tandem:num_requests_running",
        "tandem:num_requests_waiting",
        "tandem:kv_cache_usage_perc",
        "tandem:prefix_cache_queries_total",
        "tandem:prefix_cache_hits_total",
        "tandem:num_preemptions_total",
    ):
        server.metric(name, model_name=MODEL)
    assert server.metric("tandem:prompt_tokens_total") > 0
    assert server.metric("tandem:generation_tokens_total") >= 3
    assert server.metric("tandem:request_success_total", finished_reason="length") >= 1
    for name in (
        "time_to_first_token_seconds",
        "inter_token_latency_seconds",
        "e2e_request_latency_seconds",
        "request_queue_time_seconds",
    ):
        assert server.metric(f"tandem:{name}_count", model_name=MODEL) >= 1


def test_sigterm_drains_running_requests_then_exits_0(tmp_path):
    timeout = 60
    proc = ServerProcess([*ENGINE_ARGS, "--shutdown-timeout", str(timeout)], tmp_path / "log")
    try:
        events: list[str] = []
        started = threading.Event()

        def stream() -> None:
            body = {"prompt": PROMPTS[0], "max_tokens": 12, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", proc.url + "/v1/completions", json=body, timeout=60) as r:
                for event in sse_events(r):
                    events.append(event)
                    started.set()

        worker = threading.Thread(target=stream)
        worker.start()
        assert started.wait(60)
        proc.terminate()
        worker.join(timeout)
        assert proc.proc.wait(timeout) == 0, proc.log()
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
        with pytest.raises(httpx.TransportError):
            httpx.get(proc.url + "/health", timeout=2)
    finally:
        proc.stop()


# -- backpressure, the text-length check, and prompt_tokens_details off by default ---------
LIMITED = {"max_concurrent": 8, "max_waiting": 4, "max_sequences": 4}


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    """A server with small limits, one running sequence at a time and default settings
    otherwise (no API key, prompt_tokens_details off)."""
    log = tmp_path_factory.mktemp("limited") / "server.log"
    args = [*ENGINE_ARGS, "--max-num-seqs", "1", "--body-read-timeout", "20",
            "--max-concurrent-requests", str(LIMITED["max_concurrent"]),
            "--max-waiting-requests", str(LIMITED["max_waiting"]),
            "--max-sequences-per-request", str(LIMITED["max_sequences"])]  # fmt: skip
    proc = ServerProcess(args, log)
    yield proc
    proc.stop()


def test_prompt_tokens_details_are_opt_in(limited):
    body = {"prompt": PROMPTS[0], "max_tokens": 2}
    usage = httpx.post(limited.url + "/v1/completions", json=body, timeout=60).json()["usage"]
    assert usage["prompt_tokens"] > 0 and usage.get("prompt_tokens_details") is None


def test_prompts_times_n_over_the_cap_get_400(limited):
    cap = LIMITED["max_sequences"]
    for body in (
        {"prompt": ["a", "b", "c"], "n": 2, "max_tokens": 1},
        {"messages": CHATS[0], "n": cap + 1, "max_tokens": 1},
    ):
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        reply = httpx.post(limited.url + path, json=body, timeout=60)
        assert reply.status_code == 400, reply.text
        error = reply.json()["error"]
        assert error["param"] == "n" and "--max-sequences-per-request" in error["message"]
    ok = {"prompt": ["a", "b"], "n": 2, "max_tokens": 1}
    assert httpx.post(limited.url + "/v1/completions", json=ok, timeout=60).status_code == 200


def test_text_too_long_for_any_tokenization_is_refused_untokenized(limited):
    from tandem.engine.model_loader import default_model_path
    from tandem.engine.tokenizer import load_tokenizer
    from tandem.services.api_server.tokenizer_pool import max_token_chars

    limit = MAX_MODEL_LEN * max_token_chars(load_tokenizer(default_model_path()))
    text = "a" * limit
    for path, body, param in (
        ("/v1/completions", {"prompt": text, "max_tokens": 1}, "prompt"),
        ("/tokenize", {"prompt": text}, "prompt"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": text}]}, "messages"),
    ):
        reply = httpx.post(limited.url + path, json=body, timeout=60)
        assert reply.status_code == 400, (path, reply.text)
        error = reply.json()["error"]
        assert error["param"] == param and "characters" in error["message"], error
    # Shorter text is tokenized and then measured in tokens, as before.
    reply = httpx.post(limited.url + "/v1/completions", json={"prompt": "a b " * 400}, timeout=60)
    assert reply.status_code == 400 and "tokens" in reply.json()["error"]["message"]


def _send_raw(url: str, body: dict) -> socket.socket:
    """A connection that has sent ``body`` to /v1/completions and reads nothing (a
    streamed response sends its head only once the request runs)."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    head = (
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    )
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(head.encode() + data)
    return sock


def _wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_a_full_queue_gets_503_with_retry_after(limited):
    body = {"prompt": PROMPTS[0], "max_tokens": 300, "ignore_eos": True, "stream": True}
    hi = {"prompt": "hi", "max_tokens": 1}
    with contextlib.ExitStack() as stack:
        # One runs (--max-num-seqs 1), two wait: the queue is at its limit.
        for _ in range(1 + LIMITED["max_waiting"]):
            stack.enter_context(_send_raw(limited.url, body))
        _wait_for(
            lambda: limited.metric("tandem:num_requests_waiting") >= LIMITED["max_waiting"],
            30,
            "the requests never queued",
        )
        reply = httpx.post(limited.url + "/v1/completions", json=hi, timeout=60)
        assert reply.status_code == 503, reply.text
        assert reply.headers["retry-after"] == "1"
        error = reply.json()["error"]
        assert error["code"] == "server_overloaded" and "--max-waiting-requests" in error["message"]
    # Closing the connections aborts those requests; the server takes requests again.
    _wait_for(
        lambda: (
            limited.metric("tandem:num_requests_running")
            + limited.metric("tandem:num_requests_waiting")
            == 0
        ),
        30,
        "the aborted requests never left",
    )
    assert httpx.post(limited.url + "/v1/completions", json=hi, timeout=60).status_code == 200


def test_too_many_concurrent_requests_get_503_with_retry_after(limited):
    """Requests whose bodies have not arrived yet hold their places as any request does."""
    host, port = limited.url.removeprefix("http://").split(":")
    head = (
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        "Content-Length: 100\r\n\r\n"
    )
    replies: list[httpx.Response] = []

    def answered(status: int) -> bool:
        hi = {"prompt": "hi", "max_tokens": 1}
        replies.append(httpx.post(limited.url + "/v1/completions", json=hi, timeout=60))
        return replies[-1].status_code == status

    with contextlib.ExitStack() as stack:
        for _ in range(LIMITED["max_concurrent"]):
            sock = stack.enter_context(socket.create_connection((host, int(port)), timeout=30))
            sock.sendall(head.encode() + b'{"prompt": ')
        # The server reads the heads asynchronously: the limit holds once it has them all.
        _wait_for(lambda: answered(503), 10, "the limit never held")
        assert replies[-1].headers["retry-after"] == "1"
        assert "--max-concurrent-requests" in replies[-1].json()["error"]["message"]
        assert httpx.get(limited.url + "/health").status_code == 200  # probes are not counted
    # The held connections are gone: their places come free.
    _wait_for(lambda: answered(200), 10, "never served again")
