"""``tandem up`` end to end: the router, one prefill and one decode instance (KV over UCX)
as child processes on the tiny model; an answer equal to colocated ``LLM.generate``; a
SIGTERM that drains and stops every child, exit status 0."""

from __future__ import annotations

import signal
import subprocess
import time

import httpx
import pd_helpers
import pytest
from api_server_process import free_port
from pd_helpers import ENGINE_OPTIONS
from tandem.engine import SamplingParams
from tandem.services.launch import tandem_argv

pytestmark = pytest.mark.timeout(240)
model_dir, llm = pd_helpers.FIXTURES[:2]  # the tiny model and its colocated LLM

PROMPT = "Once upon a time, in a kingdom by the sea, there lived a princess who loved maps. She"
GREEDY = {"temperature": 0, "max_tokens": 8}


def test_tandem_up_serves_and_stops_cleanly(model_dir, llm, tmp_path):
    """``tandem up``: children started, one answer equal to colocated, SIGTERM drains all."""
    port = free_port()
    command = tandem_argv("up", str(model_dir))
    command += ["--port", str(port), "--remote-prefill-min-tokens", "1"]
    for name, value in ENGINE_OPTIONS.items():
        command += ["--" + name.replace("_", "-"), str(value)]
    log = tmp_path / "up.log"
    with open(log, "wb") as out:
        up = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 150
        while b"Tandem is up" not in log.read_bytes():
            assert up.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.25)
        body = {"prompt": PROMPT, **GREEDY}
        got = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60)
        want = llm.generate(PROMPT, SamplingParams(**GREEDY), use_tqdm=False)[0]
        assert got.json()["choices"][0]["text"] == want.outputs[0].text
        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=60) == 0, log.read_text()[-3000:]
        assert log.read_text().count("drained and stopped") == 3  # router, prefill, decode
    finally:
        if up.poll() is None:
            up.kill()
