"""The engine core: scheduler, model runner and KV connector, one step at a time.

Tokenized requests in (``EngineCoreRequest``), token news out (``EngineCoreOutput``, no
text): detokenization, stop strings and the user-facing outputs live in front of it
(``processor.py``, ``output_processor.py``). The offline ``LLMEngine`` runs a core in its
own thread; ``AsyncLLM`` runs it in its own process (``core_proc.py``), so nothing a server
does shares the core's GIL.
"""

from __future__ import annotations

import gc
import pathlib
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import torch
from tandem.engine import envs
from tandem.engine.config import EngineConfig, EngineRuntime, resolve_device
from tandem.engine.kv_events import KVCacheEvent
from tandem.engine.model_loader import load_hf_config
from tandem.engine.model_runner import ModelRunner
from tandem.engine.profiling import StepProfiler
from tandem.engine.request import Request, RequestStatus
from tandem.engine.sampling_params import SamplingParams
from tandem.engine.scheduler import Scheduler
from tandem.engine.scheduler_output import EngineCoreOutput
from tandem.engine.stats import EngineStats
from tandem.engine.tokenizer import load_eos_token_ids
from tandem.kvtransfer import TransferRecord, create_connector


@dataclass
class EngineCoreRequest:
    """One sample of a user request, tokenized and checked by the front end."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    cache_salt: str | None = None
    output_token_ids: list[int] = field(default_factory=list)  # continued from elsewhere
    kv_transfer_params: dict[str, Any] | None = None
    prompt_owner_id: str | None = None  # n > 1: the sibling whose prompt blocks it shares
    arrival_time: float = 0.0  # time.monotonic() when it arrived (same clock, same host)


@dataclass
class EngineInfo:
    """What an engine core says about itself once it is built (fixed for its life)."""

    engine_id: str
    model_dir: str
    dtype: str  # torch dtype name, e.g. 'bfloat16'
    runtime: EngineRuntime
    block_size: int
    kv_connector: str | None
    kv_layout: dict[str, str | int]  # what a KV peer must match (empty without a connector)
    kv_address: tuple[str, int]  # the connector's data listener ('', 0: none)
    weight_bytes_before: int = 0  # before quantization
    weight_bytes_after: int = 0


@dataclass
class StepTiming:
    """Seconds spent in steps, and the part of it inside the model forward."""

    num_steps: int = 0
    step_seconds: float = 0.0
    forward_seconds: float = 0.0


def _keep_freed_memory() -> None:
    """Ask glibc's malloc to keep freed memory instead of returning it to the kernel.

    A step allocates activations of megabytes; by default glibc maps each with mmap and
    unmaps it on free, so every step pays for faulting in and zeroing fresh pages
    (measured: prefill ran 15-20% faster on 2048-token steps with this). Elsewhere than
    glibc this does nothing.
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    libc.mallopt(m_mmap_threshold, 1 << 25)  # 32 MiB: the largest glibc takes
    libc.mallopt(m_trim_threshold, 1 << 30)  # mallopt takes a C int
    libc.mallopt(m_top_pad, 1 << 26)


class EngineCore:
    def __init__(self, config: EngineConfig, model_dir: str) -> None:
        _keep_freed_memory()
        torch.manual_seed(config.model.seed)
        self.config = config
        device = resolve_device(config.model.device)  # first: a missing GPU fails fast
        hf_config = load_hf_config(model_dir)
        self.engine_id = config.transfer.engine_id or uuid.uuid4().hex[:12]
        connector_sched = connector_worker = None
        if config.transfer.kv_connector:
            connector_sched, connector_worker = create_connector(
                config.transfer.kv_connector,
                self.engine_id,
                config.scheduler.role,
                config.cache.block_size,
                config.transfer,
                model_name=pathlib.Path(model_dir).name,
            )
        self.runner = ModelRunner(config, model_dir, hf_config, connector_worker, device)
        capacity = self.runner.num_kv_blocks * config.cache.block_size
        max_len = config.model.max_model_len or hf_config.max_position_embeddings
        # A model the engine computes exactly only up to some length (a sliding window the
        # attention backends lack) sets max_model_len_limit; the model logs the cap.
        max_len = min(max_len, getattr(self.runner.model, "max_model_len_limit", None) or max_len)
        self.runtime = EngineRuntime(
            num_kv_blocks=self.runner.num_kv_blocks,
            max_model_len=min(max_len, capacity),  # a longer request could never fit
            eos_token_ids=load_eos_token_ids(config.model.tokenizer or model_dir, model_dir),
            vocab_size=hf_config.vocab_size,
            device=device,
        )
        self.runner.eos_token_ids = self.runtime.eos_token_ids
        self.scheduler = Scheduler(config, self.runtime, connector_sched)
        connector = self.runner.connector
        self.info = EngineInfo(
            engine_id=self.engine_id,
            model_dir=str(model_dir),
            dtype=str(self.runner.dtype).removeprefix("torch."),
            runtime=self.runtime,
            block_size=config.cache.block_size,
            kv_connector=config.transfer.kv_connector,
            kv_layout=dict(connector.layout) if connector is not None else {},
            kv_address=tuple(connector.address) if connector is not None else ("", 0),
            weight_bytes_before=self.runner.weight_bytes_before,
            weight_bytes_after=self.runner.weight_bytes_after,
        )
        self.timing = StepTiming()
        # Everything built so far lives as long as the engine: out of the collector's
        # sight, a full collection no longer walks the model and its tensors mid-step
        # (measured: 3.5% of a batch-64 decode loop went to gc before this).
        gc.collect()
        gc.freeze()
        self.profiler: StepProfiler | None = None
        if envs.profile_dir():
            self.profiler = StepProfiler(envs.profile_dir())
            self.profiler.instrument(self.runner.model)
            self.runner.profiler = self.profiler

    # -- requests -------------------------------------------------------------------------
    def add_request(self, request: EngineCoreRequest) -> None:
        owner = None
        if request.prompt_owner_id is not None:
            owner = self.scheduler.requests.get(request.prompt_owner_id)
        self.scheduler.add_request(
            Request(
                request.request_id,
                request.prompt_token_ids,
                request.sampling_params,
                max_model_len=self.runtime.max_model_len,
                block_size=self.config.cache.block_size,
                cache_salt=request.cache_salt,
                output_token_ids=request.output_token_ids,
                kv_transfer_params=request.kv_transfer_params,
                prompt_owner=owner,
                arrival_time=request.arrival_time or None,
            )
        )

    def abort_requests(
        self, request_ids: list[str], status: RequestStatus = RequestStatus.FINISHED_ABORTED
    ) -> None:
        self.scheduler.finish_requests(request_ids, status)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # -- the loop -------------------------------------------------------------------------
    def step(self) -> list[EngineCoreOutput]:
        start = time.perf_counter()
        scheduler_output = self.scheduler.schedule()
        scheduled = time.perf_counter()
        model_output = self.runner.execute(scheduler_output)
        executed = time.perf_counter()
        outputs = self.scheduler.update_from_output(scheduler_output, model_output)
        end = time.perf_counter()
        self.timing.num_steps += 1
        self.timing.step_seconds += end - start
        self.timing.forward_seconds += self.runner.last_forward_seconds
        if self.profiler is not None:
            self.profiler.num_steps += 1
            self.profiler.add("schedule", scheduled - start)
            self.profiler.add("update", end - executed)
        return outputs

    # -- observability --------------------------------------------------------------------
    def stats(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(
            num_requests_running=len(s.running),
            num_requests_waiting=len(s.waiting) + len(s.waiting_for_remote),
            kv_cache_usage_perc=s.kv.usage(),
            prefix_cache_queries=s.kv.stats.num_queries,
            prefix_cache_hits=s.kv.stats.num_hits,
            num_preemptions=s.num_preemptions,
            num_free_kv_blocks=s.kv.pool.num_free_blocks,
            num_leased_requests=len(s.leased),
        )

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block no request holds; False, with nothing freed, while
        requests are running."""
        return self.scheduler.kv.pool.reset_prefix_cache()

    def enable_kv_events(self) -> None:
        self.scheduler.kv.pool.emit_events = True

    def take_kv_events(self) -> list[KVCacheEvent]:
        return self.scheduler.kv.pool.take_events()

    def drain_transfer_records(self) -> list[TransferRecord]:
        connector = self.runner.connector
        return connector.drain_transfer_records() if connector is not None else []

    def close(self) -> None:
        """Stop the KV connector's listeners and connections (the core is going away)."""
        connector = self.runner.connector
        if connector is not None:
            connector.close()
