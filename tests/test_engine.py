"""Engine behaviour on the real default model (SmolLM2-135M-Instruct, float32)."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
from tandem.engine import LLM, SamplingParams
from tandem.engine.async_llm import AsyncLLM, EngineDeadError
from tandem.engine.kv_events import BlockStored

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea:",
    "def fibonacci(n):",
    "List three colors:",
]


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(dtype="float32", kv_cache_memory="256MiB", max_num_seqs=16)


def assert_pool_idle(llm: LLM) -> None:
    kv = llm.engine.scheduler.kv
    kv.check_integrity()
    assert kv.pool.num_free_blocks == kv.pool.num_blocks, "leaked KV blocks"
    assert not llm.engine.has_unfinished_requests()


def test_generate_accepts_text_lists_and_token_ids(llm):
    params = SamplingParams(temperature=0, max_tokens=8)
    by_text = llm.generate(PROMPTS[0], params, use_tqdm=False)
    ids = llm.get_tokenizer()(PROMPTS[0]).input_ids
    by_ids = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)
    assert by_text[0].outputs[0].token_ids == by_ids[0].outputs[0].token_ids
    assert by_text[0].prompt == PROMPTS[0] and by_text[0].prompt_token_ids == ids
    out = by_text[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 8 and out.text
    assert_pool_idle(llm)


def test_chat_uses_the_template(llm):
    out = llm.chat(
        [{"role": "user", "content": "What is 2+2?"}],
        SamplingParams(temperature=0, max_tokens=16),
        use_tqdm=False,
    )[0]
    assert "<|im_start|>assistant" in out.prompt
    assert out.prompt_token_ids.count(1) == out.prompt.count("<|im_start|>")  # no doubled specials
    assert out.outputs[0].text.strip()


def test_n_samples_share_prompt_blocks_and_differ():
    llm = LLM(dtype="float32", kv_cache_memory="64MiB", enable_prefix_caching=False)
    prompt = {"prompt_token_ids": list(range(1000, 1100))}  # 100 tokens: 6 full blocks
    engine = llm.engine
    engine.add_request("r", prompt, SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=8))
    peak = 0
    while engine.has_unfinished_requests():
        outputs = engine.step()
        peak = max(
            peak, engine.scheduler.kv.pool.num_blocks - engine.scheduler.kv.pool.num_free_blocks
        )
    (final,) = [o for o in outputs if o.finished]
    assert len(final.outputs) == 4 and [c.index for c in final.outputs] == [0, 1, 2, 3]
    assert len({tuple(c.token_ids) for c in final.outputs}) > 1
    # copied prompts would need 4 x 7 blocks; shared ones need 6 + 4 x 1
    assert peak <= 6 + 4 * 1, peak
    assert_pool_idle(llm)


def test_seeded_request_is_independent_of_the_batch(llm):
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=12)
    alone = llm.generate(PROMPTS[1], seeded, use_tqdm=False)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=1.0, max_tokens=12)] * 3
    batch = llm.generate(
        [PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[3]],
        [others[0], seeded, others[1], others[2]],
        use_tqdm=False,
    )
    assert batch[1].outputs[0].token_ids == alone


def test_stop_strings_do_not_leak_unless_asked(llm):
    greedy = (
        llm.generate(
            "The capital of France is", SamplingParams(temperature=0, max_tokens=16), use_tqdm=False
        )[0]
        .outputs[0]
        .text
    )
    stop = greedy.strip().split()[1]  # a word from the middle of the greedy text
    cut = llm.generate(
        "The capital of France is",
        SamplingParams(temperature=0, max_tokens=16, stop=[stop]),
        use_tqdm=False,
    )
    out = cut[0].outputs[0]
    assert stop not in out.text and greedy.startswith(out.text)
    assert out.finish_reason == "stop" and out.stop_reason == stop
    kept = llm.generate(
        "The capital of France is",
        SamplingParams(temperature=0, max_tokens=16, stop=[stop], include_stop_str_in_output=True),
        use_tqdm=False,
    )
    assert kept[0].outputs[0].text.endswith(stop)
    assert_pool_idle(llm)


def test_logprobs_and_prompt_logprobs(llm):
    out = llm.generate(
        PROMPTS[0],
        SamplingParams(temperature=0, max_tokens=4, logprobs=3, prompt_logprobs=2),
        use_tqdm=False,
    )[0]
    comp = out.outputs[0]
    assert len(comp.logprobs) == 4
    for token, position in zip(comp.token_ids, comp.logprobs):
        assert position[token].rank == 1  # greedy picks the top token
        assert 3 <= len(position) <= 4 and all(lp.logprob <= 0 for lp in position.values())
    assert comp.cumulative_logprob == pytest.approx(
        sum(p[t].logprob for t, p in zip(comp.token_ids, comp.logprobs))
    )
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(out.prompt_token_ids)
    for token, position in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:]):
        assert token in position


def test_abort_at_any_time_returns_every_block(llm):
    engine = llm.engine
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"abort-{i}", prompt, SamplingParams(max_tokens=50))
    engine.abort_request("abort-0")  # before any step
    engine.step()
    engine.abort_request("abort-1")  # after its prefill
    for _ in range(3):
        engine.step()
    engine.abort_request("abort-2")
    engine.abort_request("abort-3")
    engine.abort_request("never-existed")
    engine.step()
    assert_pool_idle(llm)


def test_prefix_cache_reports_cached_tokens_and_events(llm):
    events = []
    llm.engine.subscribe_kv_events(events.extend)
    prompt = {"prompt_token_ids": list(range(2000, 2040))}
    first = llm.generate(prompt, SamplingParams(max_tokens=2), use_tqdm=False)[0]
    second = llm.generate(prompt, SamplingParams(max_tokens=2), use_tqdm=False)[0]
    assert first.num_cached_tokens == 0 and second.num_cached_tokens == 32
    stored = [e for e in events if isinstance(e, BlockStored)]
    assert stored and stored[0].token_ids[:16] == list(range(2000, 2016))


def test_bad_input_raises_naming_the_field(llm):
    for kwargs, field in [
        ({"n": 0}, "n"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"logprobs": 1000}, "logprobs"),
        ({"n": 1000}, "n"),
        ({"stop": [""]}, "stop"),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ]:
        with pytest.raises(ValueError, match=field):
            SamplingParams(**kwargs)
    with pytest.raises(ValueError, match="prompt"):
        llm.generate({"prompt_token_ids": []}, use_tqdm=False)
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate(
            {"prompt_token_ids": [5] * (llm.engine.runtime.max_model_len + 1)}, use_tqdm=False
        )
    with pytest.raises(ValueError, match="prompt_token_ids"):
        llm.generate({"prompt_token_ids": [10**9]}, use_tqdm=False)
    with pytest.raises(TypeError, match="block_sise"):
        LLM(block_sise=16)
    # A request continued from elsewhere whose given tokens already hit a stop string.
    tokenizer = llm.get_tokenizer()
    done = tokenizer(" Paris.").input_ids
    with pytest.raises(ValueError, match="output_token_ids"):
        llm.engine.add_request(
            "continued",
            PROMPTS[0],
            SamplingParams(temperature=0, max_tokens=8, stop=["Paris"]),
            output_token_ids=done,
        )
    assert "continued" not in llm.engine.output_processor.requests
    assert_pool_idle(llm)


def run_until_finished(llm: LLM, request_id: str):
    """Step the engine until ``request_id`` finishes; its final output."""
    while llm.engine.has_unfinished_requests():
        for output in llm.engine.step():
            if output.request_id == request_id and output.finished:
                return output
    raise AssertionError(f"request {request_id} never finished")


def test_continued_request_keeps_the_given_logprobs(llm):
    """Tokens continued with their logprobs: the same logprobs and cumulative logprob as
    one uninterrupted run."""

    def params() -> SamplingParams:
        return SamplingParams(temperature=0, max_tokens=8, logprobs=2)

    want = llm.generate(PROMPTS[1], params(), use_tqdm=False)[0].outputs[0]
    llm.engine.add_request(
        "continued-lp",
        PROMPTS[1],
        params(),
        output_token_ids=want.token_ids[:2],
        output_logprobs=want.logprobs[:2],
    )
    got = run_until_finished(llm, "continued-lp").outputs[0]
    assert got.token_ids == want.token_ids and len(got.logprobs) == len(got.token_ids)
    for position, wanted in zip(got.logprobs, want.logprobs):
        assert position.keys() == wanted.keys()
        for token, lp in wanted.items():
            assert position[token].logprob == pytest.approx(lp.logprob, abs=1e-4)
            assert (position[token].rank, position[token].decoded_token) == lp[1:]
    assert got.cumulative_logprob == pytest.approx(want.cumulative_logprob, abs=1e-3)
    first = want.token_ids[:1]
    other = next(t for t in range(100) if t not in want.logprobs[0])
    for with_logprobs, given in [
        (True, None),  # a first token without its logprobs
        (True, want.logprobs[:2]),  # two positions for one token
        (True, [{other: want.logprobs[0][first[0]]}]),  # a position lacking its token
        (False, want.logprobs[:1]),  # logprobs the request did not ask for
    ]:
        bad = params() if with_logprobs else SamplingParams(temperature=0, max_tokens=8)
        with pytest.raises(ValueError, match="output_logprobs"):
            llm.engine.add_request(
                "bad-lp", PROMPTS[1], bad, output_token_ids=first, output_logprobs=given
            )
        assert "bad-lp" not in llm.engine.output_processor.requests
    assert_pool_idle(llm)


def test_async_engine_streams_deltas_and_aborts(llm):
    """The engine core in its own process: deltas stream, leaving a stream aborts, bad
    input raises ValueError, and the core ends idle with every block back."""
    engine = AsyncLLM.from_options(dtype="float32", kv_cache_memory="64MiB")
    assert engine.client.proc.pid != os.getpid()

    async def idle_stats():
        for _ in range(100):
            stats = engine.get_stats()
            if not stats.num_requests_running and not stats.num_requests_waiting:
                return stats
            await asyncio.sleep(0.05)
        raise AssertionError(f"engine not idle: {engine.get_stats()}")

    async def main():
        params = SamplingParams(temperature=0, max_tokens=10)
        deltas = [o async for o in engine.generate(PROMPTS[0], params, "a")]
        assert deltas[-1].finished and sum(len(d.outputs[0].token_ids) for d in deltas) == 10
        text = "".join(d.outputs[0].text for d in deltas)
        async for _ in engine.generate(PROMPTS[1], SamplingParams(max_tokens=200), "b"):
            break  # leaving the stream aborts the request
        with pytest.raises(ValueError, match="temperature|prompt"):
            async for _ in engine.generate({"prompt_token_ids": []}, SamplingParams(), "c"):
                pass
        stats = await idle_stats()
        assert await engine.call_utility("check_integrity") is True
        return text, stats

    try:
        text, stats = asyncio.run(main())
    finally:
        engine.shutdown()
    assert stats.num_free_kv_blocks == engine.info.runtime.num_kv_blocks
    offline = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)
    assert text == offline[0].outputs[0].text  # same weights, greedy: the offline API's text
    assert engine.client.proc.poll() is not None  # shut down, not left running


def test_a_dead_engine_process_fails_requests_at_once():
    engine = AsyncLLM.from_options(dtype="float32", kv_cache_memory="64MiB")

    async def main():
        params = SamplingParams(temperature=0, max_tokens=10_000, ignore_eos=True)
        stream = engine.generate(PROMPTS[0], params, "long")
        await anext(stream)
        killed = time.monotonic()
        os.kill(engine.client.proc.pid, signal.SIGKILL)
        with pytest.raises(EngineDeadError):
            async for _ in stream:
                pass
        noticed = time.monotonic() - killed
        with pytest.raises(EngineDeadError):
            await anext(engine.generate(PROMPTS[0], params, "after"))
        return noticed

    try:
        noticed = asyncio.run(main())
    finally:
        engine.shutdown()
    assert noticed < 1.0, noticed
    assert isinstance(engine.dead_error, EngineDeadError)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_dtypes_run(dtype):
    import torch

    half = LLM(dtype=dtype, kv_cache_memory="32MiB")
    assert half.engine.runner.kv_cache.dtype == getattr(torch, dtype)
    out = half.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 6 and out[0].outputs[0].text.strip()


def test_gguf_file_loads_directly(llm):
    from tandem.engine.model_loader import default_gguf_path

    direct = LLM(str(default_gguf_path()), dtype="float32", kv_cache_memory="32MiB")
    params = SamplingParams(temperature=0, max_tokens=6)
    want = llm.generate(PROMPTS[0], params, use_tqdm=False)[0].outputs[0].token_ids
    assert direct.generate(PROMPTS[0], params, use_tqdm=False)[0].outputs[0].token_ids == want
