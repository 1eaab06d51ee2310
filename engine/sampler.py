"""Sampler: turns the last-position logits of a batch into one next token per request.

The model runner builds a SamplingMetadata from the batch's SamplingParams (vLLM semantics)
and calls Sampler once per step; the SamplerOutput goes to the output processor. The stages
run in vLLM's order: raw logprobs, penalties, min_tokens bans, then greedy argmax or
temperature, min_p, top_k, top_p and an exponential-race draw. Each stage is skipped when
no row uses it, because this runs every step for up to 256 rows x ~50k vocab on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import NamedTuple

import torch
from tandem.engine import cpu_ops, envs

_GREEDY_EPS = 1e-5
# top_p looks for the nucleus among this many most likely tokens first: a partial topk is
# ~10x cheaper than a full sort of a 50k vocab, and real model distributions are peaked
# enough that the nucleus almost always fits. Rows where it does not fall back to a sort.
_TOP_P_CANDIDATES = 1024


@dataclass
class SamplingMetadata:
    temperature: torch.Tensor  # [num_reqs] float32; rows with < 1e-5 are greedy
    all_greedy: bool
    all_random: bool
    top_p: torch.Tensor | None  # [num_reqs] float32, None when no row uses it (1.0 = off)
    top_k: torch.Tensor | None  # [num_reqs] int64, None when no row uses it (0 = off)
    min_p: torch.Tensor | None  # [num_reqs] float32, None when no row uses it (0.0 = off)
    generators: dict[int, torch.Generator]  # row -> generator, for seeded rows
    max_num_logprobs: int | None  # None: no row wants logprobs
    presence_penalties: torch.Tensor | None  # [num_reqs] float32, None when all 0
    frequency_penalties: torch.Tensor | None  # [num_reqs] float32, None when all 0
    repetition_penalties: torch.Tensor | None  # [num_reqs] float32, None when all 1
    prompt_token_ids: list[list[int]]  # per row (used by repetition penalty)
    output_token_ids: list[list[int]]  # per row (used by all penalties)
    min_tokens_banned: dict[int, set[int]]  # row -> token ids to forbid (EOS/stop ids)


class SamplerOutput(NamedTuple):
    sampled_token_ids: torch.Tensor  # [num_reqs] int64
    # [num_reqs, 1 + max_num_logprobs]: the sampled token first, then the top-k by logprob
    logprob_token_ids: torch.Tensor | None
    logprobs: torch.Tensor | None  # [num_reqs, 1 + max_num_logprobs] float32
    sampled_token_ranks: torch.Tensor | None  # [num_reqs] int64, 1 = most likely


class Sampler:
    """Stateless; seeded rows carry their state in the generators of the metadata."""

    def __call__(self, logits: torch.Tensor, metadata: SamplingMetadata) -> SamplerOutput:
        """Samples one token per row. ``logits`` ([num_reqs, vocab_size]) is not modified."""
        # vLLM V1 reports logprobs of the model's raw distribution, before any processing.
        raw_logprobs = None
        if metadata.max_num_logprobs is not None:
            raw_logprobs = torch.log_softmax(logits.float(), dim=-1)

        if metadata.all_greedy and not _changes_logits(metadata):
            sampled = _argmax(logits)  # in the logits' dtype: no float copy of the vocab
        else:
            sampled = _sample(_apply_penalties_and_bans(logits, metadata), metadata)

        if raw_logprobs is None:
            return SamplerOutput(sampled, None, None, None)
        ids, lps, ranks = gather_logprobs(raw_logprobs, sampled, metadata.max_num_logprobs)
        return SamplerOutput(sampled, ids, lps, ranks)


def gather_logprobs(
    logprobs: torch.Tensor, token_ids: torch.Tensor, num_logprobs: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logprobs [N, V] (log_softmax already applied), token_ids [N] -> (ids [N, 1+k],
    lps [N, 1+k], ranks [N]) with the given token first then the top-k."""
    token_ids = token_ids.long()
    top_lps, top_ids = logprobs.topk(num_logprobs, dim=-1)  # [N, k], descending
    token_lps = logprobs.gather(-1, token_ids[:, None])  # [N, 1]
    # Summing bools into int32 is ~2x faster on CPU than the default int64.
    ranks = (logprobs > token_lps).sum(dim=-1, dtype=torch.int32).long() + 1  # [N]
    ids = torch.cat([token_ids[:, None], top_ids], dim=1)
    lps = torch.cat([token_lps, top_lps], dim=1)
    return ids, lps, ranks


def _penalized(md: SamplingMetadata) -> bool:
    return (
        md.repetition_penalties is not None
        or md.frequency_penalties is not None
        or md.presence_penalties is not None
    )


def _changes_logits(md: SamplingMetadata) -> bool:
    """Whether a penalty or a min_tokens ban applies to some row."""
    return _penalized(md) or bool(md.min_tokens_banned)


def _apply_penalties_and_bans(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """Float32 logits with penalties and min_tokens bans applied; copies only if one applies."""
    penalized = _penalized(md)
    if not penalized and not md.min_tokens_banned:
        return logits.float()  # no copy when already float32; nothing below edits it

    logits = logits.to(torch.float32, copy=True)  # logits: [num_reqs, vocab_size]
    if penalized:
        _apply_penalties(logits, md)
    if md.min_tokens_banned:
        rows = [row for row, ids in md.min_tokens_banned.items() for _ in ids]
        cols = [token_id for ids in md.min_tokens_banned.values() for token_id in ids]
        logits[rows, cols] = float("-inf")
    return logits


def _apply_penalties(logits: torch.Tensor, md: SamplingMetadata) -> None:
    """Repetition, then frequency, then presence penalty, in place."""
    # Penalties touch only the few tokens each row has seen, so they work on flat indices
    # into logits rather than on dense [num_reqs, vocab_size] masks and counts. Repeated
    # indices need no torch.unique (slow on CPU): an indexed write of values read before it
    # writes the same value for every repeat, and index_add_ accumulates them on purpose.
    flat_logits = logits.view(-1)  # [num_reqs * vocab_size]
    vocab_size = logits.shape[1]
    output_rows, output_index = _flat_token_index(md.output_token_ids, vocab_size, logits.device)
    rep, freq, pres = md.repetition_penalties, md.frequency_penalties, md.presence_penalties
    if rep is not None:
        seen_ids = [p + o for p, o in zip(md.prompt_token_ids, md.output_token_ids, strict=True)]
        seen_rows, seen = _flat_token_index(seen_ids, vocab_size, logits.device)
        values = flat_logits.index_select(0, seen)  # [num_seen], with repeats
        penalty = rep[seen_rows]
        # Dividing a positive logit and multiplying a negative one both lower it.
        flat_logits.scatter_(0, seen, torch.where(values > 0, values / penalty, values * penalty))
    if freq is not None:
        flat_logits.index_add_(0, output_index, -freq[output_rows])  # count times freq
    if pres is not None:
        values = flat_logits.index_select(0, output_index)
        flat_logits.scatter_(0, output_index, values - pres[output_rows])  # once per token


def _flat_token_index(
    token_ids: list[list[int]], vocab_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row of each listed token, and its index into a flattened [num_reqs, vocab_size]."""
    # token_ids: num_reqs lists; both results: [total number of listed tokens] int64
    lengths = torch.tensor([len(ids) for ids in token_ids], device=device)
    rows = torch.repeat_interleave(torch.arange(len(token_ids), device=device), lengths)
    flat = torch.tensor(list(chain.from_iterable(token_ids)), dtype=torch.long, device=device)
    return rows, rows * vocab_size + flat


def _sample(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """One token per row: argmax for greedy rows, a random draw for the rest."""
    # logits: [num_reqs, vocab_size]
    if md.all_greedy:
        return _argmax(logits)
    if md.all_random:
        return _sample_random(logits, md, rows=None)
    sampled = _argmax(logits)
    rows = (md.temperature >= _GREEDY_EPS).nonzero().squeeze(1)
    if rows.numel() > 0:
        sampled[rows] = _sample_random(logits[rows], md, rows)
    return sampled


def _argmax(values: torch.Tensor) -> torch.Tensor:
    """Index of each row's largest value (the first of ties). On the CPU a fused op reads
    bf16 logits as they are (torch's bf16 max is ~6x slower than its float32 one, and the
    float copy costs as much again); elsewhere ``max(dim)``, which ran 2.4x faster than
    ``argmax`` on [64, 49152] float32 rows here, with the same indices."""
    if values.device.type == "cpu" and envs.cpu_fused_ops() and cpu_ops.available():
        return cpu_ops.row_argmax(values)
    return values.max(dim=-1).indices


def _sample_random(
    logits: torch.Tensor, md: SamplingMetadata, rows: torch.Tensor | None
) -> torch.Tensor:
    """Samples rows ``rows`` of the batch (all rows when None); ``logits`` holds only those."""

    def pick(values: torch.Tensor | None) -> torch.Tensor | None:
        return values if values is None or rows is None else values[rows]

    generators = md.generators
    if rows is not None:
        position = {row: i for i, row in enumerate(rows.tolist())}
        generators = {position[r]: g for r, g in md.generators.items() if r in position}

    temperature = pick(md.temperature)
    # probs: [num_rows, vocab_size]; filters below zero entries without renormalizing,
    # since every filter and the final draw are invariant to each row's scale.
    probs = torch.softmax(logits / temperature[:, None], dim=-1)
    min_p, top_k, top_p = pick(md.min_p), pick(md.top_k), pick(md.top_p)
    if min_p is not None:
        max_probs = probs.amax(dim=-1, keepdim=True)
        probs.masked_fill_(probs < min_p[:, None] * max_probs, 0.0)
    if top_k is not None:
        _apply_top_k(probs, top_k)
    if top_p is not None:
        _apply_top_p(probs, top_p)
    return _exponential_race(probs, generators)


def _apply_top_k(probs: torch.Tensor, top_k: torch.Tensor) -> None:
    """Zeroes, in place, all but each row's k largest probs (ties with the k-th are kept)."""
    vocab_size = probs.shape[-1]
    k = top_k.clamp(0, vocab_size)  # [num_rows], 0 = off
    max_k = int(k.max())
    if max_k == 0:
        return
    top = probs.topk(max_k, dim=-1).values  # [num_rows, max_k], descending
    kth = top.gather(1, (k - 1).clamp(min=0)[:, None])  # [num_rows, 1]
    cutoff = torch.where(k[:, None] > 0, kth, torch.zeros_like(kth))
    probs.masked_fill_(probs < cutoff, 0.0)


def _apply_top_p(probs: torch.Tensor, top_p: torch.Tensor) -> None:
    """Zeroes, in place, all but the smallest set of most likely tokens holding top_p of the
    remaining mass; the most likely token always stays, ties with the last kept one stay."""
    vocab_size = probs.shape[-1]
    limit = top_p * probs.sum(dim=-1)  # [num_rows]; probs are not renormalized
    num_candidates = min(_TOP_P_CANDIDATES, vocab_size)
    top = probs.topk(num_candidates, dim=-1).values  # [num_rows, num_candidates], descending
    cutoff, covered = _nucleus_cutoff(top, limit)
    short = ~covered & (top_p < 1.0)
    if short.any():
        rows = short.nonzero().squeeze(1)
        ordered = probs[rows].sort(dim=-1, descending=True).values  # [num_short, vocab_size]
        cutoff[rows] = _nucleus_cutoff(ordered, limit[rows])[0]
    cutoff = torch.where(top_p < 1.0, cutoff, torch.zeros_like(cutoff))  # 1.0 = off
    probs.masked_fill_(probs < cutoff[:, None], 0.0)


def _nucleus_cutoff(
    ordered: torch.Tensor, limit: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Smallest kept prob per row, and whether ``ordered`` reached ``limit`` (else the
    nucleus may extend past these candidates)."""
    # ordered: [num_rows, n] descending; limit: [num_rows]
    cum = ordered.cumsum(dim=-1)
    # A token is kept while the mass before it is short of the limit, so the first always is.
    num_kept = 1 + (cum[:, :-1] < limit[:, None]).sum(dim=-1)  # [num_rows]
    cutoff = ordered.gather(1, (num_kept - 1)[:, None]).squeeze(1)
    covered = (cum[:, -1] >= limit) | (ordered[:, -1] == 0)
    return cutoff, covered


def _exponential_race(probs: torch.Tensor, generators: dict[int, torch.Generator]) -> torch.Tensor:
    """argmax(probs / q) with q ~ Exp(1) per entry: a draw from probs, scale-free, no cumsum."""
    # probs: [num_rows, vocab_size], rows need not sum to 1
    u = torch.empty_like(probs)
    if len(generators) < probs.shape[0]:
        u.uniform_()  # every unseeded row from the global RNG in one call
    for row, generator in generators.items():
        # A seeded row's draw depends only on its own generator, whatever shares the batch.
        u[row].uniform_(generator=generator)
    # -log(U) is Exp(1) and ~3x cheaper than exponential_() on CPU. U in [0, 1) gives
    # q in (0, inf]: never a 0/0, and q = inf only zeroes that entry's chance in this draw.
    q = u.log_().neg_()
    return _argmax(probs.div_(q))
