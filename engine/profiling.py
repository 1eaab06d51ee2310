"""Where a step's time goes: the profiling mode (``TANDEM_PROFILE=DIR``).

When on, the engine core adds up the wall time of each part of its steps (schedule,
input building, forward, sampling, update, sending the outputs) and splits the forward
by layer type (GEMM, attention, norm, rotary, activation, embedding, the rest) by timing
each module's own calls less its children's (``instrument``); ``start_trace`` /
``stop_trace`` record a torch profiler trace into DIR as well. The front end adds its own
parts (receiving, detokenizing, HTTP). Off, none of it runs: the step pays one ``is None``.
"""

from __future__ import annotations

import json
import pathlib
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn


def _category(module: nn.Module) -> str:
    """The layer type a module's own time counts as, from its class name."""
    name = type(module).__name__
    if name == "Attention":
        return "attention"  # the backend call (LlamaAttention and kin are 'other': glue)
    if name.endswith("Linear"):  # nn.Linear, MergedLinear, PackedLinear, QuantLinear
        return "gemm"
    if name.endswith("Norm"):  # RMSNorm, LayerNorm
        return "norm"
    if "Rotary" in name:
        return "rotary"
    if name.endswith("Embedding"):
        return "embedding"
    if name.endswith("MLP"):  # what an MLP does besides its linears
        return "activation"
    return "other"


class StepProfiler:
    def __init__(self, trace_dir: str | pathlib.Path | None = None) -> None:
        self.trace_dir = pathlib.Path(trace_dir) if trace_dir else None
        self.phases: dict[str, float] = defaultdict(float)
        self.forward: dict[str, float] = defaultdict(float)
        self.num_steps = 0
        self._stack: list[list[float]] = []  # [start, time of children] per open call
        self._trace: Any = None

    def reset(self) -> None:
        self.phases.clear()
        self.forward.clear()
        self.num_steps = 0

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] += time.perf_counter() - start

    def add(self, name: str, seconds: float) -> None:
        self.phases[name] += seconds

    # -- the forward, by layer type -------------------------------------------------------
    def instrument(self, model: nn.Module) -> None:
        """Time every module's calls; each one's own time (less its children's) goes to
        its layer type. Done once, on a built model."""
        for module in model.modules():
            if module is model:
                continue
            category = _category(module)
            original = module.forward

            def timed(*args, _original=original, _category=category, **kwargs):
                self._stack.append([time.perf_counter(), 0.0])
                try:
                    return _original(*args, **kwargs)
                finally:
                    start, children = self._stack.pop()
                    elapsed = time.perf_counter() - start
                    self.forward[_category] += elapsed - children
                    if self._stack:
                        self._stack[-1][1] += elapsed

            module.forward = timed

    # -- torch profiler trace -------------------------------------------------------------
    def start_trace(self) -> None:
        if self.trace_dir is None or self._trace is not None:
            return
        from torch.profiler import ProfilerActivity, profile

        self._trace = profile(activities=[ProfilerActivity.CPU], record_shapes=False)
        self._trace.__enter__()

    def stop_trace(self, name: str) -> str | None:
        if self._trace is None:
            return None
        self._trace.__exit__(None, None, None)
        self.trace_dir.mkdir(parents=True, exist_ok=True)
        path = self.trace_dir / f"{name}-{int(time.time())}.trace.json"
        self._trace.export_chrome_trace(str(path))
        self._trace = None
        return str(path)

    # -- the report -----------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        """Milliseconds per step of each phase and of each layer type inside the forward."""
        n = max(self.num_steps, 1)
        forward_total = sum(self.forward.values())
        forward = dict(self.forward)
        if "forward" in self.phases:  # outside any module: the model's own glue
            forward["other"] = forward.get("other", 0.0) + max(
                self.phases["forward"] - forward_total, 0.0
            )
        return {
            "num_steps": self.num_steps,
            "phases_ms_per_step": {k: 1000 * v / n for k, v in sorted(self.phases.items())},
            "forward_ms_per_step": {k: 1000 * v / n for k, v in sorted(forward.items())},
        }


def format_report(report: dict[str, Any], title: str) -> str:
    """The report as a small table: each part's milliseconds per step and its share."""
    lines = [f"== {title}: {report.get('num_steps', 0)} steps, ms per step =="]
    for section in ("phases_ms_per_step", "forward_ms_per_step", "front_end_ms_per_step"):
        values = report.get(section)
        if not values:
            continue
        total = sum(values.values()) or 1.0
        lines.append(f"  {section.removesuffix('_ms_per_step')}:")
        for name, ms in sorted(values.items(), key=lambda kv: -kv[1]):
            lines.append(f"    {name:<22}{ms:9.3f}  {100 * ms / total:5.1f}%")
    return "\n".join(lines)


def dump(report: dict[str, Any], path: str | pathlib.Path) -> None:
    pathlib.Path(path).write_text(json.dumps(report, indent=2))
