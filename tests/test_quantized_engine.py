"""The quantized engine on the real default model (SmolLM2-135M-Instruct, float32, CPU):
weight memory, greedy agreement with the unquantized engine, and perplexity.

One engine load per configuration (module-scoped fixtures, each dropped once measured);
the figures print with ``pytest -s``.
"""

from __future__ import annotations

import gc
import math
from typing import NamedTuple

import pytest
from tandem.engine import LLM, SamplingParams

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea:",
    "def fibonacci(n):",
    "List three colors:",
    "The three laws of thermodynamics are",
    "Once upon a time, in a small village,",
]
MAX_TOKENS = 32
TEXT = (
    "The water cycle describes how water moves between the oceans, the air and the land. "
    "Heat from the sun makes water evaporate from seas and lakes; the vapour rises, cools "
    "and condenses into clouds. When the droplets grow heavy enough they fall as rain or "
    "snow, which runs off into rivers or soaks into the ground, and in time the water "
    "returns to the sea, where the cycle begins again. Plants take part as well: they draw "
    "water from the soil and release vapour through their leaves."
)


class EngineRun(NamedTuple):
    prompt_ids: list[list[int]]
    tokens: list[list[int]] | None  # greedy continuation of each prompt, when run
    nll: float  # mean negative log-likelihood per token of TEXT
    bytes_before: int
    bytes_after: int
    teacher_forced: list[list[int]]  # rank of the baseline's token at each position


def _engine(model_dir, quantization: str | None) -> LLM:
    return LLM(
        model=str(model_dir),
        dtype="float32",
        quantization=quantization,
        kv_cache_memory="64MiB",
        max_num_seqs=len(PROMPTS) + 1,
        enable_prefix_caching=False,
    )


def _run(
    model_dir, quantization: str | None, baseline: EngineRun | None = None, decode: bool = True
) -> EngineRun:
    """Greedy outputs (when ``decode``: each decode step dequantizes every weight on the
    CPU, the slow part), then in one batch TEXT's perplexity and the rank this model gives
    each token of the baseline's greedy outputs (teacher forcing)."""
    llm = _engine(model_dir, quantization)
    tokenizer = llm.get_tokenizer()
    prompt_ids = [tokenizer(p).input_ids for p in PROMPTS]
    tokens = None
    if decode:
        greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompt_ids], greedy, use_tqdm=False)
        tokens = [list(o.outputs[0].token_ids) for o in outs]
    inputs = [{"prompt_token_ids": tokenizer(TEXT).input_ids}]
    if baseline is not None:
        inputs += [{"prompt_token_ids": p + t} for p, t in zip(prompt_ids, baseline.tokens)]
    scored = llm.generate(inputs, SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    text_ids, text_lps = scored[0].prompt_token_ids, scored[0].prompt_logprobs
    nll = -sum(p[t].logprob for t, p in zip(text_ids[1:], text_lps[1:])) / (len(text_ids) - 1)
    forced = []
    for out, prompt in zip(scored[1:], prompt_ids):
        ids, lps = out.prompt_token_ids, out.prompt_logprobs
        forced.append([lps[i][ids[i]].rank for i in range(len(prompt), len(ids))])
    runner = llm.engine.runner
    run = EngineRun(
        prompt_ids, tokens, nll, runner.weight_bytes_before, runner.weight_bytes_after, forced
    )
    del llm, runner
    gc.collect()
    return run


def _agreement(run: EngineRun, baseline: EngineRun) -> tuple[float | None, float]:
    """(free-running: share of positions where both greedy outputs hold the same token,
    teacher-forced: share of the baseline's greedy tokens this model also ranks first
    given the same preceding tokens)."""
    free = None
    if run.tokens is not None:
        pairs = [(a, b) for x, y in zip(run.tokens, baseline.tokens) for a, b in zip(x, y)]
        free = sum(a == b for a, b in pairs) / len(pairs)
    first = sum(r == 1 for ranks in run.teacher_forced for r in ranks)
    return free, first / sum(len(r) for r in run.teacher_forced)


@pytest.fixture(scope="module")
def baseline(default_model_dir) -> EngineRun:
    return _run(default_model_dir, None)


@pytest.fixture(scope="module")
def int8(default_model_dir, baseline) -> EngineRun:
    return _run(default_model_dir, "int8", baseline)


@pytest.fixture(scope="module")
def int4(default_model_dir, baseline) -> EngineRun:
    return _run(default_model_dir, "int4", baseline, decode=False)


def _report(name: str, run: EngineRun, baseline: EngineRun) -> tuple[float, float, float, float]:
    ratio = run.bytes_before / run.bytes_after
    free, forced = _agreement(run, baseline)
    ppl_ratio = math.exp(run.nll - baseline.nll)
    free_text = "not run" if free is None else f"{free:.1%}"
    print(
        f"\n{name}: weights {run.bytes_before / 2**20:.1f} -> {run.bytes_after / 2**20:.1f} MiB "
        f"({ratio:.2f}x); greedy agreement {forced:.1%} teacher-forced, {free_text} "
        f"free-running; perplexity {math.exp(baseline.nll):.3f} -> {math.exp(run.nll):.3f} "
        f"(x{ppl_ratio:.4f})"
    )
    return ratio, free, forced, ppl_ratio


def test_unquantized_engine_reports_unchanged_weight_bytes(baseline):
    assert baseline.bytes_before == baseline.bytes_after > 500 * 2**20  # 135M float32


def test_int8_meets_the_memory_agreement_and_perplexity_goals(int8, baseline):
    """Agreement is asserted teacher-forced: given the unquantized model's greedy output so
    far, does the quantized model pick the same next token. Free-running outputs part for
    good at the first near-tie that flips (float32 reassociation alone can do that), so
    their positional match mostly measures where the first flip falls; it is reported,
    with a floor."""
    ratio, free, forced, ppl_ratio = _report("int8", int8, baseline)
    assert int8.bytes_before == baseline.bytes_before
    assert ratio >= 1.9
    assert forced >= 0.9
    assert free >= 0.5
    assert abs(ppl_ratio - 1) <= 0.05
    # The project's rule for two paths that may part on a near-tie: up to each sequence's
    # first divergence the tokens are equal, and there the baseline's token is still in
    # this model's top 5 (same preceding tokens on both sides).
    for ranks, got, want in zip(int8.teacher_forced, int8.tokens, baseline.tokens):
        first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
        if first is not None:
            assert ranks[first] <= 5, f"position {first}: rank {ranks[first]} under int8"


def test_int4_meets_the_memory_goal_and_stays_coherent(int4, baseline):
    ratio, _, forced, ppl_ratio = _report("int4", int4, baseline)
    assert ratio >= 3
    # No goal for int4's agreement in the issue: a floor that a broken kernel or packing
    # (random tokens) would miss by far.
    assert forced >= 0.5
    assert ppl_ratio <= 1.5
