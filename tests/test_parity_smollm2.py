"""Parity with transformers for the real default model (SmolLM2-135M-Instruct, float32).

One transformers greedy reference per prompt, computed once; the engine then runs the
batch under each configuration of ``parity.CONFIGURATIONS``.
"""

from __future__ import annotations

import pytest
import torch
from parity import CONFIGURATIONS, Tolerance, check_configuration, hf_greedy

NUM_NEW_TOKENS = 24
# 30 float32 layers: logprobs differ by <= 6.4e-5 from transformers here (summation order
# only); 1e-3 leaves ~15x headroom for other CPUs and BLAS builds. A divergence is excused
# only as a near-tie within 1e-2, in one sequence of the nine at most.
TOLERANCE = Tolerance(logprob=1e-3, tie_gap=1e-2, max_divergent=1)

_SHARED = (
    "You are a careful assistant. Answer in plain English, keep every answer short, and "
    "say so when you do not know something instead of guessing. The user asks: "
)
TEXTS = [
    "Hello",
    "The capital of France is",
    _SHARED + "What is the boiling point of water at sea level?",
    _SHARED + "Why is the sky blue during the day but red at sunset?",
    _SHARED + "Name three programming languages and one thing each is good at.",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "def fibonacci(n):\n    ",
    "A list of fruits: apples, bananas,",
    "Photosynthesis is the process by which green plants use sunlight, water and carbon "
    "dioxide to make their own food. In simple terms, it works like this:",
]


@pytest.fixture(scope="module")
def prompts(default_model_dir) -> list[list[int]]:
    from tandem.engine.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(default_model_dir)
    return [tokenizer(text).input_ids for text in TEXTS]


@pytest.fixture(scope="module")
def references(default_model_dir, prompts):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)
    return hf_greedy(model.eval(), prompts, NUM_NEW_TOKENS)


def test_prompts_cover_lengths_and_a_shared_prefix(prompts):
    lengths = sorted(map(len, prompts))
    assert lengths[0] <= 3 and lengths[-1] >= 40, lengths
    shared = [p for p, t in zip(prompts, TEXTS) if t.startswith(_SHARED)]
    common = min(len(p) for p in shared)
    while any(p[:common] != shared[0][:common] for p in shared):
        common -= 1
    assert common >= 32, "the shared prefix must fill two blocks to be cached"


@pytest.mark.parametrize("configuration", CONFIGURATIONS)
def test_parity(configuration, prompts, references):
    reports = check_configuration(configuration, None, prompts, references, TOLERANCE)
    for report in reports:
        print(f"smollm2 {configuration}: {report.summary()}")
