"""Sampler tests: each stage against a direct, independent computation on tiny vocabularies."""

from __future__ import annotations

import math

import pytest
import torch
from tandem.engine import sampler as sampler_module
from tandem.engine.sampler import (
    Sampler,
    SamplingMetadata,
    _apply_penalties_and_bans,
    _apply_top_k,
    _apply_top_p,
    gather_logprobs,
)

NUM_DRAWS = 20_000
# Frequencies over NUM_DRAWS have a standard deviation of at most ~0.0035.
FREQ_TOL = 0.015


def make_metadata(
    temperature: list[float],
    *,
    top_p: list[float] | None = None,
    top_k: list[int] | None = None,
    min_p: list[float] | None = None,
    generators: dict[int, torch.Generator] | None = None,
    max_num_logprobs: int | None = None,
    presence: list[float] | None = None,
    frequency: list[float] | None = None,
    repetition: list[float] | None = None,
    prompt_token_ids: list[list[int]] | None = None,
    output_token_ids: list[list[int]] | None = None,
    min_tokens_banned: dict[int, set[int]] | None = None,
) -> SamplingMetadata:
    def opt(values: list | None, dtype: torch.dtype) -> torch.Tensor | None:
        return None if values is None else torch.tensor(values, dtype=dtype)

    num_reqs = len(temperature)
    temp = torch.tensor(temperature, dtype=torch.float32)
    return SamplingMetadata(
        temperature=temp,
        all_greedy=bool((temp < 1e-5).all()),
        all_random=bool((temp >= 1e-5).all()),
        top_p=opt(top_p, torch.float32),
        top_k=opt(top_k, torch.int64),
        min_p=opt(min_p, torch.float32),
        generators=generators or {},
        max_num_logprobs=max_num_logprobs,
        presence_penalties=opt(presence, torch.float32),
        frequency_penalties=opt(frequency, torch.float32),
        repetition_penalties=opt(repetition, torch.float32),
        prompt_token_ids=prompt_token_ids or [[] for _ in range(num_reqs)],
        output_token_ids=output_token_ids or [[] for _ in range(num_reqs)],
        min_tokens_banned=min_tokens_banned or {},
    )


def draw_many(row_logits: list[float], **params: list) -> torch.Tensor:
    """Token frequencies of NUM_DRAWS draws from one row's logits and per-row params."""
    logits = torch.tensor([row_logits] * NUM_DRAWS)
    batch_params = {name: value * NUM_DRAWS for name, value in params.items()}
    temperature = batch_params.pop("temperature", [1.0] * NUM_DRAWS)
    torch.manual_seed(0)
    out = Sampler()(logits, make_metadata(temperature, **batch_params))
    return torch.bincount(out.sampled_token_ids, minlength=len(row_logits)) / NUM_DRAWS


def softmax_list(logits: list[float], temperature: float = 1.0) -> list[float]:
    exps = [math.exp(x / temperature) for x in logits]
    return [e / sum(exps) for e in exps]


def renormalized(probs: list[float], keep: set[int]) -> list[float]:
    mass = sum(probs[i] for i in keep)
    return [probs[i] / mass if i in keep else 0.0 for i in range(len(probs))]


def nucleus(probs: list[float], top_p: float) -> set[int]:
    """The smallest set of most likely tokens whose mass reaches top_p."""
    kept, mass = set(), 0.0
    for i in sorted(range(len(probs)), key=lambda i: -probs[i]):
        kept.add(i)
        mass += probs[i]
        if mass >= top_p:
            break
    return kept


def assert_frequencies(freqs: torch.Tensor, expected: list[float]) -> None:
    support = {i for i, p in enumerate(expected) if p > 0}
    assert set(freqs.nonzero().flatten().tolist()) == support
    assert (freqs - torch.tensor(expected)).abs().max().item() < FREQ_TOL


# Distinct probs, shuffled so that vocab order is not likelihood order.
PROBS = [0.05, 0.3, 0.1, 0.4, 0.15]
LOGITS = [math.log(p) for p in PROBS]


def test_top_k_keeps_k_most_likely() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, 3.0, -1.0, 0.0]] * 3)
    probs = logits.softmax(dim=-1)
    _apply_top_k(probs, torch.tensor([3, 1, 0]))
    rows = logits.tolist()
    for row, k in enumerate([3, 1, 6]):  # k = 0 is off: all six stay
        expected = set(sorted(range(6), key=lambda i: -rows[row][i])[:k])
        assert set(probs[row].nonzero().flatten().tolist()) == expected


@pytest.mark.parametrize("num_candidates", [2, 1024])  # 2 forces the full-sort fallback
def test_top_p_keeps_smallest_nucleus(monkeypatch: pytest.MonkeyPatch, num_candidates: int) -> None:
    monkeypatch.setattr(sampler_module, "_TOP_P_CANDIDATES", num_candidates)
    top_ps = [0.3, 0.5, 0.75, 0.9, 1.0]
    probs = torch.tensor([PROBS] * len(top_ps))
    _apply_top_p(probs, torch.tensor(top_ps))
    for row, top_p in enumerate(top_ps):
        assert set(probs[row].nonzero().flatten().tolist()) == nucleus(PROBS, top_p)


def test_top_p_on_large_flat_vocab_matches_sorted_reference() -> None:
    # 3000 near-uniform tokens: the 0.9 nucleus is far larger than the candidate set.
    generator = torch.Generator().manual_seed(7)
    logits = torch.randn(2, 3000, generator=generator, dtype=torch.float64) * 0.1
    logits[1] *= 40  # peaked row: the nucleus fits among the candidates
    probs = logits.softmax(dim=-1)
    expected = [nucleus(row, 0.9) for row in probs.tolist()]
    assert len(expected[0]) > sampler_module._TOP_P_CANDIDATES > len(expected[1])
    filtered = probs.float()
    _apply_top_p(filtered, torch.tensor([0.9, 0.9]))
    for row in range(2):
        assert set(filtered[row].nonzero().flatten().tolist()) == expected[row]


def test_top_k_draws_follow_renormalized_distribution() -> None:
    keep = set(sorted(range(5), key=lambda i: -PROBS[i])[:2])
    assert_frequencies(draw_many(LOGITS, top_k=[2]), renormalized(PROBS, keep))


def test_top_p_draws_follow_renormalized_distribution() -> None:
    expected = renormalized(PROBS, nucleus(PROBS, 0.75))
    assert_frequencies(draw_many(LOGITS, top_p=[0.75]), expected)


def test_min_p_draws_after_temperature() -> None:
    probs = softmax_list(LOGITS, temperature=2.0)  # flattened: min_p must see this one
    keep = {i for i, p in enumerate(probs) if p >= 0.55 * max(probs)}
    assert keep != {i for i, p in enumerate(PROBS) if p >= 0.55 * max(PROBS)}
    freqs = draw_many(LOGITS, temperature=[2.0], min_p=[0.55])
    assert_frequencies(freqs, renormalized(probs, keep))


def test_top_p_applies_to_top_k_renormalized() -> None:
    top_k_kept = set(sorted(range(5), key=lambda i: -PROBS[i])[:3])  # 0.4, 0.3, 0.15
    after_k = renormalized(PROBS, top_k_kept)
    keep = nucleus(after_k, 0.8)  # 0.47 + 0.35 >= 0.8, whereas on PROBS it needs a third
    assert keep != nucleus(PROBS, 0.8)
    freqs = draw_many(LOGITS, top_k=[3], top_p=[0.8])
    assert_frequencies(freqs, renormalized(after_k, keep))


def test_plain_draws_follow_softmax() -> None:
    assert_frequencies(draw_many(LOGITS, temperature=[0.5]), softmax_list(LOGITS, 0.5))


def test_penalties_match_direct_loop() -> None:
    vocab = 8
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(1))
    prompts = [[0, 1, 1], [], [7]]
    outputs = [[1, 2, 2, 2], [5, 5, 0], []]
    rep, freq, pres = [1.5, 0.7, 2.0], [0.5, -0.3, 1.0], [0.25, 1.0, -0.5]
    md = make_metadata(
        [1.0] * 3,
        repetition=rep,
        frequency=freq,
        presence=pres,
        prompt_token_ids=prompts,
        output_token_ids=outputs,
    )
    got = _apply_penalties_and_bans(logits, md)

    expected = logits.tolist()
    for row in range(3):
        for token in range(vocab):
            x = expected[row][token]
            if token in prompts[row] or token in outputs[row]:
                x = x / rep[row] if x > 0 else x * rep[row]
            x -= freq[row] * outputs[row].count(token)
            x -= pres[row] * (token in outputs[row])
            expected[row][token] = x
    torch.testing.assert_close(got, torch.tensor(expected))


def test_sampler_does_not_modify_logits() -> None:
    logits = torch.randn(2, 10)
    before = logits.clone()
    md = make_metadata(
        [0.0, 1.0],
        repetition=[2.0, 2.0],
        output_token_ids=[[1], [2]],
        min_tokens_banned={0: {3}},
        top_k=[0, 4],
    )
    Sampler()(logits, md)
    assert torch.equal(logits, before)


def test_repetition_penalty_changes_greedy_choice() -> None:
    logits = torch.tensor([[3.0, 2.0, 0.0]])
    md = make_metadata([0.0], repetition=[2.0], prompt_token_ids=[[0]])
    assert Sampler()(logits, md).sampled_token_ids.tolist() == [1]


def test_min_tokens_bans_tokens_for_greedy_and_random_rows() -> None:
    row = [5.0, 4.0, 0.0, 4.5]
    md = make_metadata([0.0, 0.0], min_tokens_banned={0: {0, 3}})
    assert Sampler()(torch.tensor([row] * 2), md).sampled_token_ids.tolist() == [1, 0]

    assert draw_many(row)[:2].sum() > 0.5  # unbanned, tokens 0 and 1 are common...
    torch.manual_seed(0)
    banned = {r: {0, 1} for r in range(NUM_DRAWS)}
    md = make_metadata([1.0] * NUM_DRAWS, min_tokens_banned=banned)
    sampled = Sampler()(torch.tensor([row] * NUM_DRAWS), md).sampled_token_ids
    assert set(sampled.tolist()) == {2, 3}  # ...banned, they never appear


def test_greedy_rows_take_argmax_in_mixed_batch() -> None:
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(3))
    md = make_metadata([0.0, 1.0, 0.0, 0.8, 0.0, 1.0], top_k=[0, 5, 0, 0, 0, 3])
    sampled = Sampler()(logits, md).sampled_token_ids
    greedy = [0, 2, 4]
    assert torch.equal(sampled[greedy], logits[greedy].argmax(dim=-1))
    all_greedy = Sampler()(logits, make_metadata([0.0] * 6)).sampled_token_ids
    assert torch.equal(all_greedy, logits.argmax(dim=-1))


def test_logprobs_are_raw_and_ranked() -> None:
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(4))
    md = make_metadata(
        [0.0, 0.5, 1.0, 2.0],
        max_num_logprobs=3,
        repetition=[3.0] * 4,
        output_token_ids=[[int(i) for i in row.topk(2).indices] for row in logits],
        top_k=[0, 2, 0, 0],
    )
    out = Sampler()(logits, md)
    raw = torch.log_softmax(logits, dim=-1)
    assert out.logprob_token_ids.shape == out.logprobs.shape == (4, 4)
    assert torch.equal(out.logprob_token_ids[:, 0], out.sampled_token_ids)
    torch.testing.assert_close(out.logprobs, raw.gather(1, out.logprob_token_ids))
    for row in range(4):
        top3 = sorted(range(30), key=lambda i: -raw[row, i].item())[:3]
        assert out.logprob_token_ids[row, 1:].tolist() == top3
        token = out.sampled_token_ids[row].item()
        rank = 1 + sum(raw[row, i].item() > raw[row, token].item() for i in range(30))
        assert out.sampled_token_ranks[row].item() == rank
    assert out.sampled_token_ranks[0].item() > 1  # the penalty moved greedy off the raw top
    assert Sampler()(logits, make_metadata([0.0] * 4)).logprobs is None


def test_gather_logprobs_orders_given_token_then_top_k() -> None:
    logprobs = torch.tensor([[-1.0, -0.5, -3.0, -0.5, -2.0], [-0.1, -4.0, -2.0, -3.0, -5.0]])
    ids, lps, ranks = gather_logprobs(logprobs, torch.tensor([4, 0]), num_logprobs=2)
    assert ids[0].tolist() == [4, 1, 3] or ids[0].tolist() == [4, 3, 1]  # tie at -0.5
    assert ids[1].tolist() == [0, 0, 2]
    torch.testing.assert_close(lps, torch.tensor([[-2.0, -0.5, -0.5], [-0.1, -0.1, -2.0]]))
    assert ranks.tolist() == [4, 1]
    tied = gather_logprobs(logprobs, torch.tensor([3, 1]), num_logprobs=0)
    assert tied[0].shape == (2, 1)
    assert tied[2].tolist() == [1, 4]  # rank counts only strictly greater logprobs


def seeded_tokens(batch: torch.Tensor, row: int, temperature: list[float], **params) -> list[int]:
    """Tokens row ``row`` draws over 40 steps, its generator seeded 1234 and row 1 (when
    random and not ``row``) seeded 99; the global RNG is reseeded differently each step."""
    generators = {row: torch.Generator().manual_seed(1234)}
    if row != 1 and len(temperature) > 1 and temperature[1] > 0:
        generators[1] = torch.Generator().manual_seed(99)
    tokens = []
    for step in range(40):
        torch.manual_seed(1000 + step * (len(temperature) + 1))
        md = make_metadata(temperature, generators=generators, **params)
        tokens.append(Sampler()(batch, md).sampled_token_ids[row].item())
    return tokens


def test_seeded_row_is_independent_of_batch() -> None:
    row_logits = torch.randn(1, 200, generator=torch.Generator().manual_seed(5)) * 0.2
    alone = seeded_tokens(row_logits, 0, [1.0])
    assert len(set(alone)) > 10  # really random, so a match below is no accident

    others = torch.randn(4, 200, generator=torch.Generator().manual_seed(6))
    batch = torch.cat([others[:3], row_logits, others[3:]])
    temps = [1.0, 0.7, 0.0, 1.0, 1.3]  # unseeded, seeded, greedy, ours, unseeded
    assert seeded_tokens(batch, 3, temps, top_k=[0, 5, 0, 0, 10]) == alone
    assert seeded_tokens(batch, 3, temps, top_p=[0.5, 1.0, 1.0, 1.0, 0.9]) == alone
