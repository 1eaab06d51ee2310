"""How a front end reaches its engine core: in another process (``MPClient``, the default)
or in a thread of this one (``InprocClient``, for the in-process loopback KV connector).

Both build the core, hand back its ``EngineInfo``, take input messages from any thread
(``send``) and call ``on_output`` from a background thread with every message the core
sends, ``Failed`` included: the last message when the core dies, however it dies.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from abc import ABC, abstractmethod
from collections.abc import Callable

from tandem.engine.config import EngineConfig
from tandem.engine.core import EngineCore, EngineInfo
from tandem.engine.core_loop import CoreLoop
from tandem.engine.core_messages import (
    CoreInput,
    CoreOutput,
    Failed,
    Ready,
    Shutdown,
    decode_output,
    encode,
)

logger = logging.getLogger("tandem.engine")

OnOutput = Callable[[CoreOutput], None]


class EngineStartError(RuntimeError):
    """The engine core could not be built; the message holds its error."""


class EngineCoreClient(ABC):
    info: EngineInfo

    @abstractmethod
    def send(self, message: CoreInput) -> None:
        """Queue a message for the core (any thread; never blocks on the core)."""

    @abstractmethod
    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the core (it closes its KV connector); kill it after ``timeout``."""


class InprocClient(EngineCoreClient):
    def __init__(self, config: EngineConfig, on_output: OnOutput) -> None:
        self.core = EngineCore(config, config.model.model)  # errors raise right here
        self.info = self.core.info
        self._inbox: queue.Queue[CoreInput] = queue.Queue()
        self._on_output = on_output
        self._thread = threading.Thread(target=self._run, name="tandem-engine", daemon=True)
        self._thread.start()

    def _receive(self, timeout: float | None) -> list[CoreInput]:
        try:
            messages = [
                self._inbox.get(timeout=timeout) if timeout != 0 else self._inbox.get_nowait()
            ]
        except queue.Empty:
            return []
        while True:
            try:
                messages.append(self._inbox.get_nowait())
            except queue.Empty:
                return messages

    def _run(self) -> None:
        try:
            CoreLoop(self.core, self._receive, self._on_output).run()
        except BaseException:  # noqa: BLE001 - the front end must hear why
            error = traceback.format_exc()
            logger.error("engine core failed:\n%s", error)
            self._on_output(Failed(error))

    def send(self, message: CoreInput) -> None:
        self._inbox.put(message)

    def shutdown(self, timeout: float = 10.0) -> None:
        self._inbox.put(Shutdown())
        self._thread.join(timeout)
        self.core.close()


class MPClient(EngineCoreClient):
    """The core in a child process; zmq over unix sockets in a private folder."""

    def __init__(
        self, config: EngineConfig, on_output: OnOutput, startup_timeout: float = 900.0
    ) -> None:
        import zmq

        self._folder = tempfile.TemporaryDirectory(prefix="tandem-core-")
        input_address = f"ipc://{self._folder.name}/input"
        output_address = f"ipc://{self._folder.name}/output"
        self._context = zmq.Context()
        self._input = self._context.socket(zmq.PUSH)
        self._input.bind(input_address)
        self._output = self._context.socket(zmq.PULL)
        self._output.bind(output_address)
        self._send_lock = threading.Lock()
        self._stopping = False
        options = {name: getattr(getattr(config, section), name)
                   for name, (section, _) in EngineConfig.option_fields().items()}  # fmt: skip
        argv = [sys.executable, "-P", "-m", "tandem.engine.core_loop"]
        argv += [input_address, output_address, json.dumps(options)]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        try:
            self.info = self._wait_ready(startup_timeout)
        except BaseException:
            self._kill()
            raise
        self._on_output = on_output
        self.decode_seconds = 0.0  # spent decoding the core's messages (profiling)
        self._thread = threading.Thread(target=self._receive, name="tandem-outputs", daemon=True)
        self._thread.start()

    def _wait_ready(self, timeout: float) -> EngineInfo:
        import zmq

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._output.poll(100, zmq.POLLIN):
                message = decode_output(self._output.recv())
                if isinstance(message, Ready):
                    return message.info
                if isinstance(message, Failed):
                    raise EngineStartError(f"the engine core could not start:\n{message.error}")
            if self.proc.poll() is not None:
                raise EngineStartError(
                    f"the engine core process exited with {self.proc.returncode} while starting"
                )
        raise EngineStartError(f"the engine core was not ready after {timeout} s")

    def _receive(self) -> None:
        """Every message to ``on_output``; the process's end (seen through a pidfd, at
        once) becomes ``Failed`` unless a shutdown was asked for."""
        import zmq

        poller = zmq.Poller()
        poller.register(self._output, zmq.POLLIN)
        pidfd = _pidfd(self.proc.pid)
        if pidfd is not None:
            poller.register(pidfd, zmq.POLLIN)
        try:
            while True:
                events = dict(poller.poll(1000))
                if self._output in events:
                    data = self._output.recv()
                    start = time.perf_counter()
                    message = decode_output(data)
                    self.decode_seconds += time.perf_counter() - start
                    self._on_output(message)
                    if isinstance(message, Failed):
                        return
                    continue
                if self.proc.poll() is not None:
                    if not self._stopping:
                        why = f"the engine core process exited with {self.proc.returncode}"
                        logger.error("%s", why)
                        self._on_output(Failed(why))
                    return
        except Exception:  # noqa: BLE001 - a broken channel is a dead core to the front end
            error = traceback.format_exc()
            logger.error("engine core channel failed:\n%s", error)
            self._on_output(Failed(error))
        finally:
            if pidfd is not None:
                os.close(pidfd)

    def send(self, message: CoreInput) -> None:
        with self._send_lock:
            self._input.send(encode(message))

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopping = True
        if self.proc.poll() is None:
            self.send(Shutdown())
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning("engine core did not stop within %s s; killing it", timeout)
        self._kill()

    def _kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        thread = getattr(self, "_thread", None)
        if thread is not None and thread is not threading.current_thread():
            thread.join(5)  # it sees the exit and stops using the socket
        self._input.close(linger=0)
        self._output.close(linger=0)
        self._context.term()
        self._folder.cleanup()


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def core_config(config: EngineConfig, model_dir: str) -> EngineConfig:
    """``config`` with its model resolved to the folder (a core never converts a GGUF)."""
    return dataclasses.replace(config, model=dataclasses.replace(config.model, model=model_dir))
