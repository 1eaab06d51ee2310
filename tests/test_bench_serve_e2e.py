"""tandem bench serve end to end: the whole command against live HTTP servers.

A small OpenAI-compatible server written here (not Tandem's) shows the command works
against any such server and takes its token counts from the streamed ``usage``; a real
`tandem serve` shows the counts match what the server itself reports on /metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import threading
import time
import urllib.request

import pytest
from aiohttp import web
from tandem.services.cli import build_parser, main
from tandem.services.launch import tandem_argv


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeOpenAIServer:
    """Streams ``max_tokens`` one-word chunks; counts prompt tokens as words, which no
    real tokenizer does, so a test can tell the server's count from the client's."""

    def __init__(self, fail_every: int = 0) -> None:
        self.bodies: list[dict] = []
        self.fail_every = fail_every
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> FakeOpenAIServer:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._generate)
        app.router.add_post("/v1/chat/completions", self._generate)
        runner = web.AppRunner(app)
        self._loop.run_until_complete(runner.setup())
        self._loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(runner.cleanup())

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake-model"}]})

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        if self.fail_every and len(self.bodies) % self.fail_every == 0:
            return web.json_response({"error": {"message": "overloaded"}}, status=503)
        chat = "messages" in body
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        num_tokens = body["max_completion_tokens"] if chat else body["max_tokens"]
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)

        async def send(data: dict) -> None:
            await response.write(f"data: {json.dumps(data)}\n\n".encode())

        if chat:
            await send({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        for i in range(num_tokens):
            await asyncio.sleep(0.002)
            piece = f" w{i}"
            choice = {"index": 0, "finish_reason": "length" if i == num_tokens - 1 else None}
            choice.update({"delta": {"content": piece}} if chat else {"text": piece})
            await send({"choices": [choice]})
        usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": num_tokens}
        usage["total_tokens"] = usage["prompt_tokens"] + num_tokens
        await send({"choices": [], "usage": usage})
        await response.write(b"data: [DONE]\n\n")
        return response


def _bench_argv(port: int, result_file, *extra: str) -> list[str]:
    return [
        "bench", "serve", "--base-url", f"http://127.0.0.1:{port}",
        "--dataset-name", "random", "--random-input-len", "24", "--random-output-len", "6",
        "--num-prompts", "6", "--save-result", "--result-file", str(result_file),
        "--disable-tqdm", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("backend", ["openai", "openai-chat"])
def test_main_against_fake_server(backend, tmp_path, capsys):
    result_file = tmp_path / "result.json"
    with FakeOpenAIServer() as server:
        argv = _bench_argv(server.port, result_file, "--backend", backend, "--save-detailed")
        assert main(argv + ["--max-concurrency", "2", "--goodput", "ttft:60000"]) == 0
    printed = capsys.readouterr().out
    assert "============ Serving Benchmark Result ============" in printed
    assert "Request goodput (req/s):" in printed
    result = json.loads(result_file.read_text())
    # The ready check sends the first prompt once more before the run.
    run_bodies = server.bodies[1:]
    assert result["completed"] == 6 and result["failed"] == 0
    assert result["model_id"] == "fake-model" and result["backend"] == backend
    assert result["max_concurrency"] == 2 and result["request_rate"] == "inf"
    assert result["total_output_tokens"] == 36 == sum(result["output_lens"])
    prompts = [b["messages"][0]["content"] if "messages" in b else b["prompt"] for b in run_bodies]
    assert result["total_input_tokens"] == sum(len(p.split()) for p in prompts)
    assert all(len(itl) == 5 for itl in result["itls"])  # six chunks, five gaps
    assert result["request_goodput"] == pytest.approx(result["request_throughput"])
    for body in run_bodies:
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
        assert body["ignore_eos"] is True and body["temperature"] == 0.0
        assert body["model"] == "fake-model"


def test_failed_requests_are_counted_not_fatal(tmp_path, capsys):
    result_file = tmp_path / "result.json"
    with FakeOpenAIServer(fail_every=3) as server:
        argv = _bench_argv(server.port, result_file, "--ready-check-timeout-sec", "0")
        assert main(argv + ["--max-concurrency", "1", "--model", "named-model"]) == 0
    assert "Skipping endpoint ready check." in capsys.readouterr().out
    result = json.loads(result_file.read_text())
    assert (result["completed"], result["failed"]) == (4, 2)
    assert result["total_output_tokens"] == 24
    assert "input_lens" not in result  # per-request lists only with --save-detailed
    assert {b["model"] for b in server.bodies} == {"named-model"}


def test_unreachable_server_is_an_error_not_a_traceback(capsys):
    argv = ["bench", "serve", "--port", str(free_port()), "--model", "m", "--num-prompts", "1",
            "--random-input-len", "8", "--ready-check-timeout-sec", "1"]  # fmt: skip
    assert main(argv) == 2
    assert "initial test request" in capsys.readouterr().err


def test_backend_and_endpoint_must_agree():
    args = build_parser().parse_args(
        ["bench", "serve", "--backend", "openai-chat", "--endpoint", "/v1/completions"]
    )
    assert args.func(args) == 2


# ---- against a real `tandem serve` --------------------------------------------------------


def _prometheus_value(text: str, name: str) -> float:
    """Sum of a metric's samples (all label sets) in Prometheus text format."""
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        metric, _, value = line.rpartition(" ")
        if metric.split("{", 1)[0] == name:
            total, found = total + float(value), True
    assert found, f"{name} not among the server's /metrics"
    return total


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


@contextlib.contextmanager
def tandem_server(log_path):
    """A real `tandem serve` on a free loopback port, ended (SIGTERM) on exit."""
    port = free_port()
    command = tandem_argv("serve", "--host", "127.0.0.1", "--port", str(port),
                          "--kv-cache-memory", "256MiB")  # fmt: skip
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, f"tandem serve exited: {log_path.read_text()[-2000:]}"
            assert time.monotonic() < deadline, "tandem serve did not become healthy"
            with contextlib.suppress(OSError):
                _get(f"http://127.0.0.1:{port}/health")
                break
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)


def _token_counters(base_url: str) -> tuple[float, float]:
    text = _get(f"{base_url}/metrics")
    return (
        _prometheus_value(text, "tandem:prompt_tokens_total"),
        _prometheus_value(text, "tandem:generation_tokens_total"),
    )


def _bench(base_url: str, result_file, *extra: str) -> dict:
    command = [*tandem_argv("bench", "serve"),
               "--base-url", base_url, "--dataset-name", "random", "--random-input-len", "32",
               "--random-output-len", "8", "--ignore-eos", "--save-result", "--save-detailed",
               "--result-file", str(result_file), *extra]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "============ Serving Benchmark Result ============" in run.stdout
    return json.loads(result_file.read_text())


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_counts_match_a_real_tandem_server(tmp_path):
    with tandem_server(tmp_path / "server.log") as base_url:
        prompt_before, generated_before = _token_counters(base_url)
        # Completions, with the ready check: the first prompt goes once more before the run.
        result = _bench(base_url, tmp_path / "completions.json", "--num-prompts", "8")
        assert (result["completed"], result["failed"]) == (8, 0)
        assert result["total_output_tokens"] == 64 and result["output_lens"] == [8] * 8
        assert all(len(itl) == 7 for itl in result["itls"])
        prompt_after, generated_after = _token_counters(base_url)
        probe_prompt, probe_output = result["input_lens"][0], result["output_lens"][0]
        assert prompt_after - prompt_before == result["total_input_tokens"] + probe_prompt
        assert generated_after - generated_before == 64 + probe_output

        # Chat, no ready check: the template's tokens count as input, as the server says.
        result = _bench(
            base_url, tmp_path / "chat.json", "--num-prompts", "4", "--backend", "openai-chat",
            "--ready-check-timeout-sec", "0", "--max-concurrency", "2",
        )  # fmt: skip
        assert (result["completed"], result["total_output_tokens"]) == (4, 32)
        assert result["total_input_tokens"] > 4 * 32  # the chat template adds tokens
        prompt_end, generated_end = _token_counters(base_url)
        assert prompt_end - prompt_after == result["total_input_tokens"]
        assert generated_end - generated_after == 32
