"""The model runner: loads the model, owns the KV cache, runs one step.

Per step: apply the scheduler's diff to its request states, build the flat batch, run
the model, sample, and return tokens (plus logprobs and finished KV transfers).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import torch
from tandem.engine import envs
from tandem.engine.attention import create_attention_backend
from tandem.engine.config import EngineConfig, parse_size
from tandem.engine.input_builder import (
    RequestState,
    StepInputs,
    build_sampling_metadata,
    build_step_inputs,
)
from tandem.engine.model_loader import iter_weights, resolve_dtype
from tandem.engine.models import get_model_class
from tandem.engine.models.cpu_fused import can_fuse, fuse_layers
from tandem.engine.models.cpu_linear import can_pack, pack_linear_layers
from tandem.engine.outputs import Logprob, PositionLogprobs
from tandem.engine.profiling import StepProfiler
from tandem.engine.quantization import create_quantization_method, quantize_model, weight_bytes
from tandem.engine.sampler import Sampler, SamplerOutput, gather_logprobs
from tandem.engine.scheduler_output import ModelRunnerOutput, SchedulerOutput
from tandem.kvtransfer.base import KVConnectorWorker

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(
        self,
        config: EngineConfig,
        model_dir,
        hf_config,
        connector: KVConnectorWorker | None = None,
        device: str = "cpu",
    ) -> None:
        self.config, self.hf_config, self.device = config, hf_config, device
        self.block_size = config.cache.block_size
        self.dtype = resolve_dtype(config.model.dtype, hf_config, device)
        self.model = self._load_model(model_dir)
        self.kv_cache = self._allocate_kv_cache()
        self.connector = connector
        if connector is not None:
            connector.register_kv_cache(self.kv_cache)
        self.sampler = Sampler()
        self.states: dict[str, RequestState] = {}
        self.eos_token_ids: frozenset[int] = frozenset()
        self.last_forward_seconds = 0.0  # the model forward of the last step
        self.profiler: StepProfiler | None = None  # set by the core in profiling mode

    @property
    def num_kv_blocks(self) -> int:
        return self.kv_cache.shape[0]

    def _load_model(self, model_dir) -> torch.nn.Module:
        model_cls = get_model_class(getattr(self.hf_config, "architectures", None))
        backend = create_attention_backend(self.config.model.attention_backend, self.device)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device):
                model = model_cls(self.hf_config, backend)
        finally:
            torch.set_default_dtype(previous)
        loaded = model.load_weights(iter_weights(model_dir))
        tied = {
            n for n, p in model.named_parameters() if p is model.get_parameter("lm_head.weight")
        }
        missing = {n for n, _ in model.named_parameters()} - loaded - tied
        if missing:
            raise ValueError(f"{model_dir}: checkpoint lacks weights {sorted(missing)[:5]}")
        self.weight_bytes_before = self.weight_bytes_after = weight_bytes(model)
        if self.config.model.quantization is not None:
            self._quantize(model)
        elif envs.cpu_packed_linear() and can_pack(model):
            pack_linear_layers(model, batch_hint=self.config.scheduler.max_num_seqs)
        if envs.cpu_fused_ops() and can_fuse(model):
            fuse_layers(model)
        return model.eval()

    def _quantize(self, model: torch.nn.Module) -> None:
        """Quantized layers keep their codes (dequantized per forward on the CPU), so the
        oneDNN packing of float weights does not apply to them."""
        m = self.config.model
        summary = quantize_model(
            model, create_quantization_method(m.quantization, m.quantization_group_size)
        )
        self.weight_bytes_after = summary.bytes_after
        logger.info(
            "quantized %d linear and %d embedding layers to %s (group size %d): weights "
            "%.1f MiB -> %.1f MiB (%.2fx smaller)",
            summary.num_linear, summary.num_embedding, summary.method, summary.group_size,
            summary.bytes_before / 2**20, summary.bytes_after / 2**20, summary.ratio,
        )  # fmt: skip

    def kv_block_bytes(self) -> int:
        cfg, bs = self.hf_config, self.block_size
        attn = self.model.model.layers[0].self_attn
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return cfg.num_hidden_layers * 2 * bs * attn.num_kv_heads * attn.head_dim * elem

    def _allocate_kv_cache(self) -> torch.Tensor:
        cache = self.config.cache
        num_blocks = (
            cache.num_kv_blocks or parse_size(cache.kv_cache_memory) // self.kv_block_bytes()
        )
        if num_blocks < 2:
            raise ValueError(f"kv_cache_memory {cache.kv_cache_memory!r} holds fewer than 2 blocks")
        attn = self.model.model.layers[0].self_attn
        shape = (
            num_blocks,
            self.hf_config.num_hidden_layers,
            2,
            self.block_size,
            attn.num_kv_heads,
            attn.head_dim,
        )
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    # -- one step -------------------------------------------------------------------------
    def _apply_diff(self, out: SchedulerOutput, failed: dict[str, str]) -> None:
        for rid in out.finished_request_ids:
            self.states.pop(rid, None)
        for new in out.new_requests:
            p = new.sampling_params
            try:
                # a seeded request draws on the logits' device, from its own generator there
                gen = None if p.seed is None else torch.Generator(self.device).manual_seed(p.seed)
            except Exception as e:  # noqa: BLE001 - this request fails, not the step
                failed[new.request_id] = f"its sampling generator could not be made: {e!r}"
                continue
            self.states[new.request_id] = RequestState(
                new.request_id,
                list(new.token_ids),
                new.num_prompt_tokens,
                p,
                list(new.block_ids),
                new.num_computed_tokens,
                gen,
            )
        for cached in out.cached_requests:
            state = self.states.get(cached.request_id)
            if state is not None:
                state.block_ids += cached.new_block_ids
                state.num_computed_tokens = cached.num_computed_tokens

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        """One step. What fails for one request alone (its inputs, its sampling) fails
        that request, named in ``failed``, and the rest of the batch runs; a failure of
        the step as a whole (the forward) raises."""
        result = ModelRunnerOutput()
        self._apply_diff(out, result.failed)
        if self.connector is not None and out.connector_meta is not None:
            self.connector.start_load_kv(out.connector_meta)
        self.last_forward_seconds = 0.0
        start = time.perf_counter()
        batch = [
            (self.states[rid], n)
            for rid, n in out.num_scheduled_tokens.items()
            if rid in self.states and rid not in result.failed
        ]
        inputs = _isolating(
            lambda part: build_step_inputs(part, self.block_size),
            batch,
            lambda item: item[0].request_id,
            "building its inputs",
            result.failed,
        )
        if inputs is not None:
            if self.device != "cpu":  # built on the host; one copy per step, none on CPU
                inputs = inputs.to(self.device)
            built = time.perf_counter()
            hidden = self.model(inputs.input_ids, inputs.positions, self.kv_cache, inputs.meta)
            forwarded = time.perf_counter()
            self.last_forward_seconds = forwarded - built
            self._sample(inputs, hidden, result)
            self._prompt_logprobs(inputs, hidden, result)
            for state, n in inputs.order:
                state.num_computed_tokens += n
            if self.profiler is not None:
                self.profiler.add("build_inputs", built - start)
                self.profiler.add("forward", forwarded - built)
                self.profiler.add("sample", time.perf_counter() - forwarded)
        if self.connector is not None:
            result.finished_transfers = self.connector.get_finished()
        return result

    def _sample(self, inputs: StepInputs, hidden: torch.Tensor, result: ModelRunnerOutput) -> None:
        if not inputs.sample_rows:
            return
        logits = self.model.compute_logits(hidden[inputs.sample_rows])  # [num_reqs, vocab]
        rows = list(enumerate(inputs.sample_states))

        def sample(part: list[tuple[int, RequestState]]) -> list[tuple[int, SamplerOutput]]:
            index = [row for row, _ in part]
            states = [state for _, state in part]
            meta = build_sampling_metadata(states, self.eos_token_ids, logits.device)
            sampled = _to_host(
                self.sampler(logits[index] if len(part) < len(rows) else logits, meta)
            )
            return [(row, _row_of(sampled, i)) for i, row in enumerate(index)]

        sampled_rows = _isolating(
            sample, rows, lambda item: item[1].request_id, "sampling", result.failed
        )
        for row, sampled in sampled_rows or []:
            state = inputs.sample_states[row]
            token = int(sampled.sampled_token_ids)
            state.token_ids.append(token)
            result.sampled_token_ids[state.request_id] = token
            k = state.params.logprobs
            if k is not None and sampled.logprobs is not None:
                ids = sampled.logprob_token_ids[: k + 1].tolist()
                lps = sampled.logprobs[: k + 1].tolist()
                rank = int(sampled.sampled_token_ranks)
                result.logprobs[state.request_id] = _position_logprobs(ids, lps, rank)

    def _prompt_logprobs(self, inputs: StepInputs, hidden, result: ModelRunnerOutput) -> None:
        row = 0
        for state, n in inputs.order:
            k, start = state.params.prompt_logprobs, state.num_computed_tokens
            if (
                k is not None
                and start < state.num_prompt_tokens
                and state.request_id not in result.failed
            ):
                # position p's logits score prompt token p + 1
                count = min(start + n, state.num_prompt_tokens - 1) - start
                entries: list[PositionLogprobs | None] = [None] if start == 0 else []
                if count > 0:
                    logits = self.model.compute_logits(hidden[row : row + count])
                    targets = torch.tensor(
                        state.token_ids[start + 1 : start + 1 + count], device=logits.device
                    )
                    gathered = gather_logprobs(torch.log_softmax(logits, -1), targets, k)
                    ids, lps, ranks = (t.cpu() for t in gathered)  # no copy on the CPU
                    for i in range(count):
                        entries.append(
                            _position_logprobs(ids[i].tolist(), lps[i].tolist(), int(ranks[i]))
                        )
                result.prompt_logprobs[state.request_id] = entries
            row += n


T = TypeVar("T")
R = TypeVar("R")


def _isolating(
    run: Callable[[list[T]], R],
    items: list[T],
    request_id: Callable[[T], str],
    what: str,
    failed: dict[str, str],
) -> R | None:
    """``run(items)``; if it raises, each item alone finds the requests at fault: they go
    into ``failed`` and the rest run again together. When every item passes alone the
    fault is the batch's, and the error is raised (a genuine failure of the step). None
    when nothing is left to run."""
    if not items:
        return None
    try:
        return run(items)
    except Exception:
        good = []
        for item in items:
            try:
                run([item])
            except Exception as e:  # noqa: BLE001 - this request fails, not the step
                logger.warning("request %s failed in %s: %r", request_id(item), what, e)
                failed[request_id(item)] = f"{what} failed: {e!r}"
            else:
                good.append(item)
        if len(good) == len(items):
            raise
    return run(good) if good else None


def _row_of(sampled: SamplerOutput, row: int) -> SamplerOutput:
    return SamplerOutput(*(None if t is None else t[row] for t in sampled))


def _to_host(sampled: SamplerOutput) -> SamplerOutput:
    """The sampler's results on the CPU, one copy per tensor (the step's sync point);
    ``Tensor.cpu()`` of a CPU tensor is the tensor itself."""
    return SamplerOutput(*(None if t is None else t.cpu() for t in sampled))


def _position_logprobs(ids: list[int], lps: list[float], rank: int) -> PositionLogprobs:
    """The chosen token (first) with its rank, then the top-k with ranks 1..k."""
    entries = {ids[0]: Logprob(lps[0], rank)}
    for j, (tid, lp) in enumerate(zip(ids[1:], lps[1:]), start=1):
        entries.setdefault(tid, Logprob(lp, j))
    return entries
