"""Flat batch inputs for one step, built once and shared by every layer.

Rows with one query token (decodes) come first so attention can batch them; each
request with several query tokens (a prefill chunk) follows as its own span.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from tandem.engine.attention import AttentionMetadata, PrefillSpan
from tandem.engine.sampler import SamplingMetadata
from tandem.engine.sampling_params import SamplingParams


@dataclass
class RequestState:
    """What the runner keeps per request between steps."""

    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    generator: torch.Generator | None = None


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    meta: AttentionMetadata
    order: list[tuple[RequestState, int]]  # (request, num_scheduled) in batch order
    sample_rows: list[int]  # row of each sampling request's last token
    sample_states: list[RequestState]

    def to(self, device: torch.device | str) -> StepInputs:
        """The model's inputs on ``device``: one host-to-device copy per tensor per step."""
        return dataclasses.replace(
            self,
            input_ids=self.input_ids.to(device, non_blocking=True),
            positions=self.positions.to(device, non_blocking=True),
            meta=self.meta.to(device),
        )


def build_step_inputs(states: list[tuple[RequestState, int]], block_size: int) -> StepInputs:
    decodes = [(s, n) for s, n in states if n == 1]
    prefills = [(s, n) for s, n in states if n > 1]
    order = decodes + prefills
    input_ids: list[int] = []
    positions: list[int] = []
    slot_block: list[int] = []
    slot_offset: list[int] = []
    sample_rows: list[int] = []
    sample_states: list[RequestState] = []
    spans: list[PrefillSpan] = []
    for state, n in order:
        start = state.num_computed_tokens
        row = len(input_ids)
        input_ids += state.token_ids[start : start + n]
        pos = range(start, start + n)
        positions += pos
        slot_block += [state.block_ids[p // block_size] for p in pos]
        slot_offset += [p % block_size for p in pos]
        if start + n == len(state.token_ids):
            sample_rows.append(row + n - 1)
            sample_states.append(state)
        if n > 1:
            spans.append(_prefill_span(state, row, n, block_size))
    nd = len(decodes)
    max_blocks = max((len(s.block_ids) for s, _ in decodes), default=1)
    tables = torch.zeros(nd, max_blocks, dtype=torch.int64)
    seq_lens = torch.empty(nd, dtype=torch.int64)
    for i, (state, _) in enumerate(decodes):
        tables[i, : len(state.block_ids)] = torch.tensor(state.block_ids)
        seq_lens[i] = state.num_computed_tokens + 1
    key_pos = torch.arange(max_blocks * block_size)
    decode_mask = (key_pos[None] < seq_lens[:, None]).view(nd, 1, 1, max_blocks * block_size)
    meta = AttentionMetadata(
        num_tokens=len(input_ids),
        slot_block=torch.tensor(slot_block, dtype=torch.int64),
        slot_offset=torch.tensor(slot_offset, dtype=torch.int64),
        num_decodes=nd,
        decode_block_tables=tables,
        decode_seq_lens=seq_lens,
        decode_mask=decode_mask,
        prefills=spans,
    )
    return StepInputs(
        torch.tensor(input_ids, dtype=torch.int64),
        torch.tensor(positions, dtype=torch.int64),
        meta,
        order,
        sample_rows,
        sample_states,
    )


def _prefill_span(state: RequestState, row: int, n: int, block_size: int) -> PrefillSpan:
    start = state.num_computed_tokens
    context = start + n
    if start == 0:
        return PrefillSpan(row, n, context, torch.empty(0, dtype=torch.int64), None)
    num_blocks = -(-context // block_size)
    block_ids = torch.tensor(state.block_ids[:num_blocks], dtype=torch.int64)
    # query i sits at position start + i and sees keys 0 ..= start + i
    mask = torch.arange(context)[None] <= torch.arange(start, context)[:, None]
    return PrefillSpan(row, n, context, block_ids, mask)


def build_sampling_metadata(
    states: list[RequestState],
    eos_token_ids: frozenset[int],
    device: torch.device | str = "cpu",
) -> SamplingMetadata:
    """The batch's sampling parameters as tensors on ``device``, the logits' device."""
    params = [s.params for s in states]
    greedy = [p.greedy for p in params]

    def column(values: list, off_value, dtype) -> torch.Tensor | None:
        if all(v == off_value for v in values):
            return None
        return torch.tensor(values, dtype=dtype, device=device)

    logprob_counts = [p.logprobs for p in params if p.logprobs is not None]
    banned: dict[int, set[int]] = {}
    for row, (state, p) in enumerate(zip(states, params)):
        if len(state.token_ids) - state.num_prompt_tokens < p.min_tokens:
            banned[row] = set(p.all_stop_token_ids) | (set() if p.ignore_eos else eos_token_ids)
    penalties = {
        "presence_penalties": column([p.presence_penalty for p in params], 0.0, torch.float32),
        "frequency_penalties": column([p.frequency_penalty for p in params], 0.0, torch.float32),
        "repetition_penalties": column([p.repetition_penalty for p in params], 1.0, torch.float32),
    }
    need_tokens = any(v is not None for v in penalties.values())
    return SamplingMetadata(
        temperature=torch.tensor(
            [p.temperature for p in params], dtype=torch.float32, device=device
        ),
        all_greedy=all(greedy),
        all_random=not any(greedy),
        top_p=column([p.top_p for p in params], 1.0, torch.float32),
        top_k=column([p.top_k for p in params], 0, torch.int64),
        min_p=column([p.min_p for p in params], 0.0, torch.float32),
        generators={i: s.generator for i, s in enumerate(states) if s.generator is not None},
        max_num_logprobs=max(logprob_counts) if logprob_counts else None,
        **penalties,
        # Token lists cost a copy per row per step: only built when a penalty needs them.
        prompt_token_ids=[s.token_ids[: s.num_prompt_tokens] for s in states]
        if need_tokens
        else [],
        output_token_ids=[s.token_ids[s.num_prompt_tokens :] for s in states]
        if need_tokens
        else [],
        min_tokens_banned=banned,
    )
