"""Parity with Hugging Face transformers: the project's correctness standard (test helpers).

Greedy token ids equal transformers' on the same weights in float32. Where two float
paths may legitimately diverge on a near-tie, the diverging token must sit in the other
side's top-5 logprobs (and that sequence is compared no further). Logprobs of the
compared positions stay close to transformers'.

The test modules run one batch of prompts through the engine under each of
``CONFIGURATIONS`` (which between them exercise prefix-cache hits, chunked prefill and
preemption by recompute) and compare every run with one transformers reference.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from tandem.engine.llm import LLM
from tandem.engine.outputs import RequestOutput
from tandem.engine.sampling_params import SamplingParams

NUM_TOP = 5  # how deep in the other side's ranking a near-tie token may sit

CONFIGURATIONS = ("default", "no_prefix_caching", "chunked_prefill", "preemption")


@dataclass(frozen=True)
class Reference:
    """Transformers' greedy continuation of one prompt."""

    token_ids: list[int]
    logprobs: torch.Tensor  # [num_steps, vocab_size] float32: log_softmax of the raw logits


@dataclass(frozen=True)
class Tolerance:
    logprob: float  # largest |engine - transformers| logprob at a compared position
    tie_gap: float  # largest logprob gap (transformers' side) between two diverging tokens
    max_divergent: int  # most sequences of one run allowed to diverge on a near-tie


@dataclass(frozen=True)
class Divergence:
    prompt_index: int
    step: int
    hf_token_id: int
    engine_token_id: int
    gap: float  # transformers' logprob of its own token minus that of the engine's


@dataclass
class ParityReport:
    num_sequences: int
    num_compared_tokens: int = 0
    max_logprob_diff: float = 0.0
    divergences: list[Divergence] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{self.num_sequences} sequences, {self.num_compared_tokens} tokens compared, "
            f"{len(self.divergences)} near-tie divergences, "
            f"max |logprob diff| {self.max_logprob_diff:.2e}"
        )


@torch.inference_mode()
def hf_greedy(model, prompts: list[list[int]], max_new_tokens: int) -> list[Reference]:
    """Transformers' greedy continuation of each prompt, one prompt at a time (no padding).

    EOS neither stops generation nor is suppressed, matching the engine's ``ignore_eos``.
    """
    from transformers import GenerationConfig

    # generate() fills every None field from model.generation_config (the checkpoint's
    # EOS, any repetition penalty), so the model's own config is swapped out meanwhile.
    config = GenerationConfig(
        do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=None, pad_token_id=0,
        repetition_penalty=1.0, output_logits=True, return_dict_in_generate=True,
    )  # fmt: skip
    saved, model.generation_config = model.generation_config, config
    references = []
    try:
        for prompt in prompts:
            input_ids = torch.tensor([prompt], device=model.device)  # the model's, CPU or GPU
            mask = torch.ones_like(input_ids)
            out = model.generate(input_ids, attention_mask=mask, generation_config=config)
            token_ids = out.sequences[0, len(prompt) :].tolist()
            assert len(token_ids) == max_new_tokens, "transformers stopped early"
            logprobs = torch.log_softmax(torch.cat(out.logits).float(), dim=-1).cpu()
            assert logprobs.argmax(-1).tolist() == token_ids, "transformers' choice is not greedy"
            references.append(Reference(token_ids, logprobs))
    finally:
        model.generation_config = saved
    return references


def engine_options(configuration: str, prompts: list[list[int]], max_tokens: int) -> dict:
    """Engine options of one named configuration for this batch."""
    if configuration == "default":
        return {}
    if configuration == "no_prefix_caching":
        return {"enable_prefix_caching": False}
    if configuration == "chunked_prefill":
        # Every prompt longer than 8 tokens is prefilled in chunks; all decodes still fit.
        return {"max_num_batched_tokens": 8, "max_num_seqs": len(prompts)}
    if configuration == "preemption":
        # Room for about two of the longest sequences: the batch cannot all run at once.
        block_size = 16
        num_blocks = -(-(max(map(len, prompts)) + max_tokens) // block_size)
        return {"block_size": block_size, "num_kv_blocks": 2 * num_blocks}
    raise ValueError(f"unknown configuration {configuration!r}; known: {CONFIGURATIONS}")


def generate_greedy(llm: LLM, prompts: list[list[int]], max_tokens: int) -> list[RequestOutput]:
    """One batch through the engine; afterwards the pool must be whole and hold nothing."""
    params = SamplingParams(
        temperature=0.0, max_tokens=max_tokens, logprobs=NUM_TOP, ignore_eos=True
    )
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    kv = llm.engine.scheduler.kv
    kv.check_integrity()
    assert not kv.req_to_blocks, f"blocks still held by {sorted(kv.req_to_blocks)}"
    assert kv.pool.num_free_blocks == kv.pool.num_blocks, "blocks leaked"
    return outputs


def compare(
    references: list[Reference], outputs: list[RequestOutput], tol: Tolerance
) -> ParityReport:
    """Compare each engine sequence with transformers' up to the first divergence.

    Fails on any divergence that is not a near-tie (each token in the other side's top-5,
    logprob gap within ``tol.tie_gap``) and on logprobs further than ``tol.logprob``.
    """
    report = ParityReport(len(references))
    for index, (ref, out) in enumerate(zip(references, outputs)):
        completion = out.outputs[0]
        token_ids, logprobs = completion.token_ids, completion.logprobs
        assert len(token_ids) == len(ref.token_ids), f"prompt {index}: {len(token_ids)} tokens"
        assert completion.logprobs is not None
        for step, (engine_id, position) in enumerate(zip(token_ids, logprobs)):
            hf_lps, hf_id = ref.logprobs[step], ref.token_ids[step]
            if engine_id != hf_id:
                report.divergences.append(
                    _near_tie(index, step, hf_id, engine_id, hf_lps, position, tol)
                )
                break
            for token_id, lp in position.items():  # the chosen token and the engine's top-5
                diff = abs(lp.logprob - float(hf_lps[token_id]))
                assert diff <= tol.logprob, (
                    f"prompt {index} step {step} token {token_id}: logprob {lp.logprob:.6f} "
                    f"vs transformers {float(hf_lps[token_id]):.6f}"
                )
                report.max_logprob_diff = max(report.max_logprob_diff, diff)
            report.num_compared_tokens += 1
    return report


def _near_tie(index, step, hf_id, engine_id, hf_lps, position, tol: Tolerance) -> Divergence:
    where = f"prompt {index} step {step}: engine chose {engine_id}, transformers {hf_id}"
    hf_top = hf_lps.topk(NUM_TOP).indices.tolist()
    engine_top = [tid for tid, lp in position.items() if lp.rank <= NUM_TOP]
    assert engine_id in hf_top, f"{where}; not in transformers' top-{NUM_TOP} {hf_top}"
    assert hf_id in engine_top, f"{where}; not in the engine's top-{NUM_TOP} {engine_top}"
    gap = float(hf_lps[hf_id] - hf_lps[engine_id])
    assert gap <= tol.tie_gap, f"{where}; logprob gap {gap:.2e} is no near-tie"
    return Divergence(index, step, hf_id, engine_id, gap)


def check_configuration(
    configuration: str,
    model_dir: str | None,
    prompts: list[list[int]],
    references: list[Reference],
    tol: Tolerance,
    **options,
) -> list[ParityReport]:
    """Run the batch under one configuration (twice for 'default': cold, then with the
    prefix cache warm) and check parity, block accounting and that the configuration
    did what it is for (cache hits, preemptions)."""
    max_tokens = len(references[0].token_ids)
    llm = LLM(
        model_dir, dtype="float32", **engine_options(configuration, prompts, max_tokens), **options
    )
    num_runs = 2 if configuration == "default" else 1
    reports = []
    for _ in range(num_runs):
        outputs = generate_greedy(llm, prompts, max_tokens)
        reports.append(compare(references, outputs, tol))
    for report in reports:
        assert len(report.divergences) <= tol.max_divergent, (
            f"{configuration}: too many divergences: {report.divergences}"
        )
    scheduler = llm.engine.scheduler
    if configuration == "no_prefix_caching":
        assert scheduler.kv.stats.num_hits == 0
    else:
        assert scheduler.kv.stats.num_hits > 0, f"{configuration}: the prefix cache never hit"
    if configuration == "preemption":
        assert scheduler.num_preemptions > 0, "the small KV pool never forced a preemption"
    return reports
