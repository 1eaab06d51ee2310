"""The API server in process, where a test can script the engine: a dead engine (503), an
engine that dies mid-stream (the error in-band, then [DONE]), a body sent without
Content-Length; plus the ``serve`` flags and the engine's queue-time hook."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient
from tandem.engine import LLM, SamplingParams
from tandem.engine.async_llm import EngineDeadError
from tandem.engine.config import EngineRuntime
from tandem.engine.outputs import CompletionOutput, RequestOutput
from tandem.engine.stats import EngineStats
from tandem.engine.tokenizer import load_tokenizer
from tandem.services.api_server.app import create_app
from tandem.services.api_server.config import server_config
from tandem.services.cli import build_parser, engine_options


class DyingEngineClient:
    """Stands in for the engine client: a real tokenizer; every request yields one delta, then the
    engine dies."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        runtime = EngineRuntime(64, 128, frozenset({2}), len(tokenizer))
        stats = EngineStats(0, 0, 0.0, 0, 0, 0)
        self.engine = SimpleNamespace(runtime=runtime, get_stats=lambda: stats)
        # The EngineClient interface (services/api_server/engine_client.py).
        self.max_model_len, self.vocab_size = runtime.max_model_len, runtime.vocab_size
        self.get_stats = self.engine.get_stats
        self.dead_error: BaseException | None = None
        self.profiler = None  # profiling mode is off

    async def generate(self, prompt, params, request_id, **kwargs):
        completion = CompletionOutput(0, "Hello", [19556], None, None)
        yield RequestOutput(request_id, None, prompt["prompt_token_ids"], None, [completion], False)
        self.dead_error = RuntimeError("step failed")
        raise EngineDeadError("the engine has died")


@pytest.fixture
def app_client(default_model_dir):
    engine_client = DyingEngineClient(load_tokenizer(default_model_dir))
    args = build_parser().parse_args(["serve", "--max-request-body-bytes", "1KiB"])
    with TestClient(create_app(engine_client, server_config(args))) as client:
        yield client, engine_client


def test_error_after_streaming_started_is_sent_in_band(app_client):
    client, _ = app_client
    body = {"prompt": "Hi", "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert json.loads(events[0])["choices"][0]["text"] == "Hello"
    assert json.loads(events[1])["error"]["code"] == "engine_dead"
    assert events[2:] == ["[DONE]"]


def test_dead_engine_answers_503(app_client):
    client, engine_client = app_client
    response = client.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]}
    )
    assert response.status_code == 503  # died during this request
    assert response.json()["error"]["type"] == "server_error"
    assert engine_client.dead_error is not None
    for method, path, body in (
        ("POST", "/v1/completions", {"prompt": "x"}),
        ("GET", "/health", None),
    ):
        response = client.request(method, path, json=body)
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "engine_dead"


def test_body_limit_holds_without_content_length(app_client):
    client, _ = app_client

    def chunks():
        yield b'{"prompt": "'
        yield b"x" * 2048
        yield b'"}'

    response = client.post("/v1/completions", content=chunks())  # chunked: no Content-Length
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


def test_serve_flags(monkeypatch):
    monkeypatch.setenv("TANDEM_API_KEY", "from-env")
    args = build_parser().parse_args(
        ["serve", "some/model", "--port", "9001", "--block-size", "32", "--shutdown-timeout", "5"]
    )
    config = server_config(args)
    assert (config.host, config.port, config.api_key) == ("127.0.0.1", 9001, "from-env")
    assert config.served_model_name == ("some/model",) and config.shutdown_timeout == 5
    assert engine_options(args) == {"model": "some/model", "block_size": 32}
    args = build_parser().parse_args(["serve", "--served-model-name", "a", "b", "--api-key", "k"])
    config = server_config(args)
    assert config.model_name == "a" and config.api_key == "k" and config.model_path is None


def test_finished_outputs_carry_queue_time():
    llm = LLM(kv_cache_memory="16MiB", max_num_seqs=1)  # one at a time: the second queues
    outputs = llm.generate(["a b c", "d e f"], SamplingParams(max_tokens=4), use_tqdm=False)
    queue_times = [o.metrics["queue_time"] for o in outputs]
    assert all(t >= 0 for t in queue_times)
    assert queue_times[1] > queue_times[0]
