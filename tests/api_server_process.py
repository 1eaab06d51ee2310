"""A real ``tandem serve`` subprocess for tests: started on a free port, ready once
``/health`` answers, killed at the end; its log is shown when it fails to start."""

from __future__ import annotations

import os
import pathlib
import re
import signal
import socket
import subprocess
import time

import httpx
from tandem.services.launch import tandem_argv


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(
        self,
        args: list[str],
        log_path: pathlib.Path,
        timeout: float = 180.0,
        command_name: str = "serve",  # or "router": the same HTTP API
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.name = f"tandem {command_name}"
        command = tandem_argv(command_name)
        command += ["--host", "127.0.0.1", "--port", str(self.port), *args]
        env = {k: v for k, v in os.environ.items() if k != "TANDEM_API_KEY"}
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"{self.name} not ready after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def metric(self, name: str, **labels: str) -> float:
        """Sum of one metric's samples whose labels include ``labels``."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        total, found = 0.0, False
        for match in re.finditer(rf"^{re.escape(name)}\{{([^}}]*)\}} (\S+)$", text, re.M):
            have = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
            if all(have.get(k) == v for k, v in labels.items()):
                total, found = total + float(match.group(2)), True
        assert found, f"{name} {labels} not in /metrics"
        return total
