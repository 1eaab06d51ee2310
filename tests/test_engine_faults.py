"""One request must never kill the engine (SmolLM2, float32).

Values that used to pass validation and then raise inside a step are refused up front,
naming the field; and a request whose own inputs or sampling fail inside a step is aborted
with an error while the rest of its batch runs on, token for token as without it.
"""

from __future__ import annotations

import pytest
from tandem.engine import LLM, SamplingParams
from tandem.engine import model_runner as runner_module

PROMPTS = ["The capital of France is", "List three colors:", "def fibonacci(n):"]
GREEDY = SamplingParams(temperature=0, max_tokens=6)


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(dtype="float32", kv_cache_memory="128MiB", max_num_seqs=8)


def assert_idle(llm: LLM) -> None:
    kv = llm.engine.scheduler.kv
    kv.check_integrity()
    assert kv.pool.num_free_blocks == kv.pool.num_blocks, "leaked KV blocks"
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"seed": 2**64}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"seed": 2**63 - 2, "n": 4}, "seed"),  # sample 3 would draw with seed + 3
        ({"seed": True}, "seed"),
        ({"top_k": 2**63}, "top_k"),
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": 1e300}, "temperature"),
        ({"top_p": float("nan")}, "top_p"),
        ({"repetition_penalty": 1e300}, "repetition_penalty"),
        ({"presence_penalty": float("-inf")}, "presence_penalty"),
        ({"max_tokens": 2**40}, "max_tokens"),
        ({"min_tokens": 2**40, "max_tokens": None}, "min_tokens"),
        ({"stop_token_ids": [2**40]}, "stop_token_ids"),
    ],
)
def test_sampling_params_refuse_values_a_step_cannot_take(values, field):
    with pytest.raises(ValueError, match=rf"^{field} "):
        SamplingParams(**values)


def test_extreme_but_valid_values_run(llm):
    """The edges of the ranges run a whole request (the seed's last sample at INT64_MAX)."""
    params = [
        SamplingParams(seed=2**63 - 4, n=4, max_tokens=3),
        SamplingParams(seed=-(2**63), max_tokens=3),
        SamplingParams(top_k=2**31 - 1, max_tokens=3),
        SamplingParams(temperature=100.0, repetition_penalty=100.0, max_tokens=3),
    ]
    outputs = llm.generate([PROMPTS[0]] * len(params), params, use_tqdm=False)
    assert [len(o.outputs) for o in outputs] == [4, 1, 1, 1]
    assert all(len(c.token_ids) == 3 for o in outputs for c in o.outputs)
    assert_idle(llm)


def test_stop_token_ids_outside_the_vocabulary_are_refused(llm):
    vocab = llm.engine.runtime.vocab_size
    params = SamplingParams(stop_token_ids=[vocab + 5], min_tokens=2, max_tokens=4)
    with pytest.raises(ValueError, match=r"^stop_token_ids: .*not a token id"):
        llm.generate(PROMPTS[0], params, use_tqdm=False)
    # the id at the edge is fine, and the engine serves on
    edge = SamplingParams(stop_token_ids=[vocab - 1], min_tokens=2, max_tokens=4)
    assert len(llm.generate(PROMPTS[0], edge, use_tqdm=False)[0].outputs[0].token_ids) == 4
    assert_idle(llm)


@pytest.mark.parametrize(
    "handle",
    [
        {"remote_engine_id": "x"},  # fields missing
        {
            "remote_engine_id": "x",
            "remote_request_id": "y",
            "remote_block_ids": [0],
            "num_remote_tokens": 40,
        },  # 40 tokens need 3 blocks  # fmt: skip
        {
            "remote_engine_id": "x",
            "remote_request_id": "y",
            "remote_block_ids": [0] * 99,
            "num_remote_tokens": 10**6,
        },  # more tokens than the prompt  # fmt: skip
        {
            "remote_engine_id": "x",
            "remote_request_id": "y",
            "remote_block_ids": [-1],
            "num_remote_tokens": 1,
        },  # fmt: skip
    ],
)
def test_malformed_kv_handles_are_refused_before_the_scheduler(llm, handle):
    with pytest.raises(ValueError, match=r"^kv_transfer_params"):
        llm.engine.add_request("bad-kv", {"prompt_token_ids": list(range(5, 45))}, GREEDY,
                               kv_transfer_params=handle)  # fmt: skip
    assert_idle(llm)


def _poison(original, culprit_of):
    """A stand-in for one of the runner's per-step functions that raises whenever the
    request named 'poison' is in what it is given: a fault in that request alone."""

    def wrapped(states, *args, **kwargs):
        if any(culprit_of(s) == "poison" for s in states):
            raise RuntimeError("injected fault")
        return original(states, *args, **kwargs)

    return wrapped


def _run(llm: LLM, with_poison: bool) -> dict[str, object]:
    engine = llm.engine
    ids = [f"good-{i}" for i in range(len(PROMPTS))]
    for rid, prompt in zip(ids, PROMPTS):
        engine.add_request(rid, prompt, GREEDY)
    if with_poison:
        engine.add_request("poison", "A poisoned request", GREEDY)
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
    return finished


@pytest.mark.parametrize(
    ("target", "culprit_of"),
    [
        ("build_sampling_metadata", lambda state: state.request_id),
        ("build_step_inputs", lambda item: item[0].request_id),
    ],
)
def test_a_request_failing_in_a_step_fails_alone(llm, monkeypatch, target, culprit_of):
    clean = _run(llm, with_poison=False)
    monkeypatch.setattr(runner_module, target, _poison(getattr(runner_module, target), culprit_of))
    mixed = _run(llm, with_poison=True)
    poison = mixed.pop("poison")
    assert poison.outputs[0].finish_reason == "abort"
    assert "injected fault" in poison.metrics["error"]
    assert {rid: o.outputs[0].token_ids for rid, o in mixed.items()} == {
        rid: o.outputs[0].token_ids for rid, o in clean.items()
    }
    assert_idle(llm)
    monkeypatch.undo()
    assert len(_run(llm, with_poison=True)["poison"].outputs[0].token_ids) == 6  # healthy again


def test_a_fault_of_the_whole_batch_still_raises(llm, monkeypatch):
    """When every request passes alone the fault is the step's: it is not papered over."""
    calls = {"n": 0}
    original = runner_module.build_step_inputs

    def fails_once_in_a_batch(states, *args):
        calls["n"] += 1
        if len(states) > 1 and calls["n"] == 1:
            raise RuntimeError("batch-wide fault")
        return original(states, *args)

    monkeypatch.setattr(runner_module, "build_step_inputs", fails_once_in_a_batch)
    engine = llm.engine
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"batch-{i}", prompt, GREEDY)
    with pytest.raises(RuntimeError, match="batch-wide fault"):
        engine.step()
    monkeypatch.undo()
    for i in range(len(PROMPTS)):
        engine.abort_request(f"batch-{i}")
    engine.step()  # the runner forgets the aborted requests
    assert_idle(llm)
