"""Prefill on engine A, decode on engine B, KV moved by the in-process loopback connector."""

from __future__ import annotations

import pytest
from tandem.engine import LLM, SamplingParams
from tandem.engine.llm_engine import LLMEngine

PROMPTS = [
    "The capital of France is",
    "Here is a long story about a dragon who lived in the mountains and guarded gold. One day,",
    "def add(a, b):",
]


@pytest.fixture(scope="module")
def engines():
    common = dict(dtype="float32", kv_cache_memory="128MiB", kv_connector="loopback")
    prefill = LLM(role="prefill", engine_id="prefill-a", **common).engine
    decode = LLM(role="decode", engine_id="decode-b", **common).engine
    colocated = LLM(dtype="float32", kv_cache_memory="128MiB")
    return prefill, decode, colocated


def run(engine: LLMEngine) -> list:
    outputs = []
    while engine.scheduler.has_work():
        outputs += [o for o in engine.step() if o.finished]
    return outputs


def disaggregated(
    prefill: LLMEngine, decode: LLMEngine, prompt: str, params: SamplingParams, rid: str
):
    prefill.add_request(rid, prompt, SamplingParams(**{**_plain(params), "max_tokens": 1}))
    (first,) = [o for o in prefill.step() if o.finished]
    assert first.kv_transfer_params is not None, "prefill side must lease the blocks"
    decode.add_request(
        rid,
        prompt,
        params,
        output_token_ids=first.outputs[0].token_ids,
        kv_transfer_params=first.kv_transfer_params,
    )
    (final,) = run(decode)
    run(prefill)  # the prefill side hears that its lease can go
    return first, final


def _plain(params: SamplingParams) -> dict:
    return {k: v for k, v in params.__dict__.items() if k != "all_stop_token_ids"}


def assert_idle(engine: LLMEngine) -> None:
    kv = engine.scheduler.kv
    kv.check_integrity()
    assert kv.pool.num_free_blocks == kv.pool.num_blocks and not engine.scheduler.leased


def test_prefill_then_decode_equals_colocated(engines):
    prefill, decode, colocated = engines
    params = SamplingParams(temperature=0, max_tokens=16)
    expected = colocated.generate(PROMPTS, params, use_tqdm=False)
    for i, (prompt, want) in enumerate(zip(PROMPTS, expected)):
        first, final = disaggregated(prefill, decode, prompt, params, f"pd-{i}")
        assert first.outputs[0].token_ids == want.outputs[0].token_ids[:1]
        assert final.outputs[0].token_ids == want.outputs[0].token_ids
        assert final.outputs[0].text == want.outputs[0].text
    assert_idle(prefill)
    assert_idle(decode)


def test_decode_side_loads_only_blocks_it_lacks(engines):
    prefill, decode, colocated = engines
    prompt = PROMPTS[1]  # > 1 block: the decode side caches its full blocks the first time
    params = SamplingParams(temperature=0, max_tokens=4)
    disaggregated(prefill, decode, prompt, params, "warm")
    loaded = []
    worker = decode.runner.connector
    original = worker.start_load_kv
    worker.start_load_kv = lambda meta: (loaded.extend(meta.loads), original(meta))[1]
    try:
        _, final = disaggregated(prefill, decode, prompt, params, "again")
    finally:
        worker.start_load_kv = original
    num_prompt_blocks = -(-len(final.prompt_token_ids) // 16)
    assert len(loaded) == 1 and len(loaded[0].local_block_ids) == 1 < num_prompt_blocks
    assert final.num_cached_tokens == (num_prompt_blocks - 1) * 16
    want = colocated.generate(prompt, params, use_tqdm=False)[0]
    assert final.outputs[0].token_ids == want.outputs[0].token_ids
    assert_idle(prefill)
    assert_idle(decode)


def test_failed_load_recomputes(engines):
    prefill, decode, colocated = engines
    params = SamplingParams(temperature=0, max_tokens=6)
    bogus = {
        "remote_engine_id": "gone",
        "remote_request_id": "x",
        "remote_block_ids": [0, 1],
        "num_remote_tokens": 20,
    }
    ids = colocated.get_tokenizer()(PROMPTS[1]).input_ids
    want = colocated.generate(PROMPTS[1], params, use_tqdm=False)[0].outputs[0].token_ids
    decode.add_request(
        "lost",
        {"prompt_token_ids": ids},
        params,
        output_token_ids=want[:1],
        kv_transfer_params=bogus,
    )
    (final,) = run(decode)
    assert final.outputs[0].token_ids == want
    assert_idle(decode)
