"""The engine core's busy loop, and the process that runs it (``python -m
tandem.engine.core_loop INPUT OUTPUT CONFIG``).

Each turn: take every message waiting (blocking only when there is nothing to step),
step once, send the step's news as one ``Outputs`` (with the core's stats, when they
changed, and finished KV loads). A request the core cannot take fails alone with an error
output; a step that raises ends the loop, and the front end hears ``Failed`` with the
traceback. The loop is the same in a process (``main``) and in a thread
(``core_client.InprocClient``); only how messages come and go differs.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable

from tandem.engine.core import EngineCore
from tandem.engine.core_messages import (
    AbortRequests,
    AddRequest,
    CoreInput,
    CoreOutput,
    Failed,
    Outputs,
    Ready,
    Shutdown,
    UtilityCall,
    UtilityResult,
    decode_input,
    encode,
)
from tandem.engine.request import RequestStatus
from tandem.engine.scheduler_output import EngineCoreOutput

logger = logging.getLogger("tandem.engine.core")

# How long the loop sleeps between steps when only leases or KV loads are in flight: they
# finish on another thread, and the scheduler hears of it at its next step.
_TRANSFER_POLL_SECONDS = 0.002


def _start_profile(core: EngineCore) -> bool:
    if core.profiler is None:
        raise RuntimeError("profiling is off; start the engine with TANDEM_PROFILE=DIR")
    core.profiler.reset()
    core.profiler.start_trace()
    return True


def _stop_profile(core: EngineCore) -> dict:
    if core.profiler is None:
        raise RuntimeError("profiling is off; start the engine with TANDEM_PROFILE=DIR")
    trace = core.profiler.stop_trace("engine-core")
    return {**core.profiler.report(), "trace": trace}


# The calls a front end may make by name (reads, and harmless switches); nothing else runs.
UTILITIES: dict[str, Callable[[EngineCore], object]] = {
    "reset_prefix_cache": lambda core: core.reset_prefix_cache(),
    "check_integrity": lambda core: core.scheduler.kv.check_integrity() is None,
    "start_profile": _start_profile,
    "stop_profile": _stop_profile,
}

Receive = Callable[[float | None], list[CoreInput]]  # timeout (None: block) -> messages
Send = Callable[[CoreOutput], None]


class CoreLoop:
    def __init__(self, core: EngineCore, receive: Receive, send: Send) -> None:
        self.core, self.receive, self.send = core, receive, send
        self._errors: list[EngineCoreOutput] = []
        self._results: list[UtilityResult] = []

    def run(self) -> None:
        """Until ``Shutdown``; a failing step raises (the core is dead)."""
        last_stats = None
        while True:
            for message in self.receive(self._timeout()):
                if isinstance(message, Shutdown):
                    return
                self._handle(message)
            outputs = self.core.step() if self.core.has_work() else []
            outputs, self._errors = self._errors + outputs, []
            records = self.core.drain_transfer_records()
            results, self._results = self._results, []
            stats = self.core.stats()
            if outputs or records or results or stats != last_stats:
                start = time.perf_counter()
                self.send(Outputs(outputs, stats, records, results))
                last_stats = stats
                if self.core.profiler is not None:
                    self.core.profiler.add("send_outputs", time.perf_counter() - start)

    def _timeout(self) -> float | None:
        if self._errors or self._results:
            return 0.0
        scheduler = self.core.scheduler
        if scheduler.running or scheduler.waiting:
            return 0.0  # work to step: take what came, do not wait for more
        if self.core.has_work():
            return _TRANSFER_POLL_SECONDS
        return None

    def _handle(self, message: CoreInput) -> None:
        if isinstance(message, AddRequest):
            request_id = message.request.request_id
            try:
                self.core.add_request(message.request)
            except Exception as e:  # noqa: BLE001 - this request fails, not the core
                logger.warning("request %s refused by the core: %s", request_id, e)
                self._errors.append(
                    EngineCoreOutput(request_id, [], finish_reason="abort", error=str(e))
                )
        elif isinstance(message, AbortRequests):
            status = RequestStatus.FINISHED_STOPPED if message.stopped else None
            self.core.abort_requests(message.request_ids, status or RequestStatus.FINISHED_ABORTED)
        elif isinstance(message, UtilityCall):
            utility = UTILITIES.get(message.method)
            if utility is None:
                result = UtilityResult(message.call_id, error=f"no utility {message.method!r}")
            else:
                try:
                    result = UtilityResult(message.call_id, utility(self.core))
                except Exception as e:  # noqa: BLE001 - the caller hears why
                    result = UtilityResult(message.call_id, error=repr(e))
            self._results.append(result)


# -- the engine-core process ----------------------------------------------------------------
def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (a front end killed hard
    must not leave an engine holding the memory); elsewhere the loop's checks do it."""
    if sys.platform != "linux":
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _receiver(socket, parent_pid: int) -> Receive:
    import msgspec
    import zmq

    poller = zmq.Poller()
    poller.register(socket, zmq.POLLIN)

    def receive(timeout: float | None) -> list[CoreInput]:
        while True:
            wait = 1.0 if timeout is None else timeout
            if poller.poll(int(wait * 1000)) or timeout is not None:
                break
            if os.getppid() != parent_pid:  # the front end is gone
                raise SystemExit("the front end exited")
        messages = []
        while True:
            try:
                data = socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                return messages
            try:
                messages.append(decode_input(data))
            except (msgspec.DecodeError, msgspec.ValidationError) as e:
                logger.error("engine core: dropping a malformed message: %s", e)

    return receive


def main(argv: list[str]) -> int:
    """``INPUT OUTPUT CONFIG``: the zmq addresses to pull inputs from and push outputs to,
    and the engine options as JSON (the model already a resolved folder)."""
    import zmq
    from tandem.engine.config import EngineConfig

    input_address, output_address, options = argv
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the front end drains, then says Shutdown
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parent_pid = os.getppid()
    context = zmq.Context()
    inputs, outputs = context.socket(zmq.PULL), context.socket(zmq.PUSH)
    inputs.connect(input_address)
    outputs.connect(output_address)

    def send(message: CoreOutput) -> None:
        outputs.send(encode(message))

    core = None
    try:
        config = EngineConfig.from_options(**json.loads(options))
        core = EngineCore(config, config.model.model)
        send(Ready(core.info))
        CoreLoop(core, _receiver(inputs, parent_pid), send).run()
        return 0
    except BaseException:  # noqa: BLE001 - the front end must hear why
        error = traceback.format_exc()
        logger.error("engine core failed:\n%s", error)
        send(Failed(error))
        return 1
    finally:
        if core is not None:
            core.close()
        outputs.close(linger=2000)  # let the last message out
        inputs.close(linger=0)
        context.term()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
