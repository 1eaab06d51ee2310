"""tandem bench serve: datasets, arrivals, metrics, SSE timing and the vLLM-format report.

The pure parts run on synthetic timelines; `test_main_against_fake_server` runs the whole
command in-process against a small OpenAI-compatible server written here, which is what
"works against any server, not only Tandem's" means. The run against a real
`tandem serve` is in test_bench_serve_e2e.py.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from tandem.benchmarks.serve import datasets, report, runner
from tandem.benchmarks.serve.client import (
    RequestInput,
    RequestOutput,
    SSEDecoder,
    StreamTimer,
    build_payload,
)
from tandem.benchmarks.serve.metrics import (
    calculate_metrics,
    parse_goodput,
    peak_output_throughput,
    summarize,
)


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    from tandem.engine.tokenizer import load_tokenizer

    return load_tokenizer(default_model_dir)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


# ---- datasets ---------------------------------------------------------------------------


def test_random_lengths_stay_in_range_and_share_the_prefix(tokenizer):
    rng = np.random.default_rng(0)
    requests = datasets.random_requests(tokenizer, 40, 64, 16, 0.5, 10, rng)
    assert len(requests) == 40
    inner = [r.prompt_len - 10 for r in requests]
    assert 32 <= min(inner) and max(inner) <= 96 and len(set(inner)) > 5
    outs = [r.expected_output_len for r in requests]
    assert 8 <= min(outs) and max(outs) <= 24 and len(set(outs)) > 3
    for r in requests:
        assert len(_ids(tokenizer, r.prompt)) == r.prompt_len
    prefixes = {tuple(_ids(tokenizer, r.prompt)[:10]) for r in requests}
    assert len(prefixes) == 1


def test_random_without_range_is_exact_and_seeded(tokenizer):
    a = datasets.random_requests(tokenizer, 8, 32, 8, 0.0, 0, np.random.default_rng(7))
    b = datasets.random_requests(tokenizer, 8, 32, 8, 0.0, 0, np.random.default_rng(7))
    assert a == b
    assert {r.prompt_len for r in a} == {32} and {r.expected_output_len for r in a} == {8}
    assert len({r.prompt for r in a}) == 8
    with pytest.raises(ValueError, match="range-ratio"):
        datasets.random_requests(tokenizer, 1, 32, 8, 1.0, 0, np.random.default_rng(0))


def test_length_bounds():
    assert datasets.length_bounds(100, 0.25) == (75, 125)
    assert datasets.length_bounds(7, 0.5) == (3, 11)  # floor low, ceil high
    assert datasets.length_bounds(10, 0.0) == (10, 10)


def test_prefix_repetition_groups(tokenizer):
    rng = np.random.default_rng(1)
    requests = datasets.prefix_repetition_requests(tokenizer, 10, 16, 8, 3, 5, rng)
    assert len(requests) == 9  # 10 // 3 prompts per prefix
    assert {r.prompt_len for r in requests} == {24}
    assert {r.expected_output_len for r in requests} == {5}
    groups: dict[tuple[int, ...], int] = {}
    for r in requests:
        key = tuple(_ids(tokenizer, r.prompt)[:16])
        groups[key] = groups.get(key, 0) + 1
    assert sorted(groups.values()) == [3, 3, 3]
    # Shuffled: the three groups do not come in blocks.
    keys = [tuple(_ids(tokenizer, r.prompt)[:16]) for r in requests]
    assert keys != sorted(keys, key=keys.index)
    with pytest.raises(ValueError, match="num-prompts"):
        datasets.prefix_repetition_requests(tokenizer, 2, 16, 8, 3, 5, rng)


def test_sharegpt_reads_first_human_turn(tokenizer, tmp_path):
    reply = "The key-value cache stores attention keys and values for reuse."
    entries = [
        {
            "conversations": [
                {"from": "human", "value": "What is a KV cache, in short?"},
                {"from": "gpt", "value": reply},
            ]
        },
        {
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "Name three prime numbers please."},
                {"from": "gpt", "value": "Two, three and five are prime."},
            ]
        },
        {"conversations": [{"from": "human", "value": "Only one turn here."}]},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]},
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(entries))
    requests = datasets.sharegpt_requests(path, tokenizer, 2, None, np.random.default_rng(0))
    by_prompt = {r.prompt: r for r in requests}
    assert set(by_prompt) == {"What is a KV cache, in short?", "Name three prime numbers please."}
    first = by_prompt["What is a KV cache, in short?"]
    assert first.expected_output_len == len(tokenizer(reply).input_ids)
    assert first.prompt_len == len(tokenizer(first.prompt).input_ids)
    # Overridden output length; more prompts than usable conversations repeats them.
    more = datasets.sharegpt_requests(path, tokenizer, 5, 32, np.random.default_rng(0))
    assert len(more) == 5 and {r.expected_output_len for r in more} == {32}
    assert {r.prompt for r in more} == set(by_prompt)


# ---- arrivals ---------------------------------------------------------------------------


def test_infinite_rate_sends_everything_at_once():
    assert runner.arrival_times(5, math.inf, 1.0, np.random.default_rng(0)) == [0.0] * 5


@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_gamma_arrivals(burstiness):
    n, rate = 20000, 50.0
    times = np.array(runner.arrival_times(n, rate, burstiness, np.random.default_rng(3)))
    assert times[-1] == pytest.approx(n / rate)  # rescaled to the nominal duration
    gaps = np.diff(np.concatenate([[0.0], times]))
    assert gaps.mean() == pytest.approx(1 / rate, rel=1e-9)
    # A gamma with shape k has coefficient of variation 1 / sqrt(k).
    assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.05)


def test_infinite_burstiness_is_evenly_spaced():
    times = runner.arrival_times(4, 2.0, math.inf, np.random.default_rng(0))
    assert times == pytest.approx([0.5, 1.0, 1.5, 2.0])
    with pytest.raises(ValueError, match="burstiness"):
        runner.arrival_times(4, 2.0, 0.0, np.random.default_rng(0))


# ---- metrics ----------------------------------------------------------------------------


def _output(start, ttft, itl, tokens, prompt_len=10, success=True, text="x"):
    return RequestOutput(
        success=success,
        generated_text=text,
        prompt_len=prompt_len,
        output_tokens=tokens,
        ttft=ttft,
        itl=list(itl),
        latency=ttft + sum(itl),
        start_time=start,
    )


def test_tpot_itl_and_totals_on_a_synthetic_timeline():
    a = _output(0.0, 0.100, [0.020, 0.030, 0.040], tokens=4, prompt_len=10)
    b = _output(0.5, 0.200, [0.050], tokens=2, prompt_len=20)
    c = _output(0.6, 0.300, [], tokens=1, prompt_len=30)
    bad = RequestOutput(success=False, prompt_len=40, error="HTTP 500")
    m = calculate_metrics([a, b, c, bad], 2.0, [50, 99], {}, lambda text: 0)
    assert (m.completed, m.failed) == (3, 1)
    assert (m.total_input, m.total_output) == (60, 7)
    assert m.output_lens == [4, 2, 1, 0] and m.input_lens == [10, 20, 30, 40]
    assert m.request_throughput == 1.5 and m.output_throughput == 3.5
    assert m.total_token_throughput == 33.5
    # TPOT = (e2el - ttft) / (tokens - 1); the one-token request has none.
    tpots = [0.090 / 3, 0.050 / 1]
    assert m.stats["tpot"].mean_ms == pytest.approx(np.mean(tpots) * 1000)
    itls = [0.020, 0.030, 0.040, 0.050]
    assert m.stats["itl"].mean_ms == pytest.approx(35.0)
    assert m.stats["itl"].percentiles_ms[1] == (99.0, pytest.approx(np.percentile(itls, 99) * 1000))
    assert m.stats["ttft"].median_ms == pytest.approx(200.0)
    assert m.stats["e2el"].mean_ms == pytest.approx((190 + 250 + 300) / 3)
    assert m.stats["ttft"].std_ms == pytest.approx(np.std([100, 200, 300]))


def test_missing_usage_counts_the_text():
    o = _output(0.0, 0.1, [0.1], tokens=None, text="three word text")
    m = calculate_metrics([o], 1.0, [99], {}, lambda text: len(text.split()))
    assert m.total_output == 3


def test_goodput_counts_requests_meeting_every_slo():
    fast = _output(0.0, 0.050, [0.010] * 4, tokens=5)  # ttft 50 ms, tpot 10 ms
    slow_start = _output(0.0, 0.400, [0.010] * 4, tokens=5)  # ttft 400 ms
    slow_decode = _output(0.0, 0.050, [0.100] * 4, tokens=5)  # tpot 100 ms
    one_token = _output(0.0, 0.050, [], tokens=1)  # tpot counts as 0
    slos = parse_goodput(["ttft:200", "tpot:50"])
    m = calculate_metrics([fast, slow_start, slow_decode, one_token], 2.0, [99], slos, len)
    assert m.request_goodput == 1.0  # two good requests over two seconds
    assert parse_goodput(None) == {}
    for bad in (["itl:5"], ["ttft"], ["ttft:fast"], ["ttft:-1"]):
        with pytest.raises(ValueError, match="goodput"):
            parse_goodput(bad)


def test_empty_metrics_are_zero_and_percentiles_match_numpy():
    assert summarize([], [99]) == (0.0, 0.0, 0.0, [(99.0, 0.0)])
    values = [0.001 * i for i in range(1, 101)]
    stats = summarize(values, [25, 99.9])
    assert stats.percentiles_ms[0][1] == pytest.approx(np.percentile(values, 25) * 1000)
    assert stats.percentiles_ms[1][0] == 99.9


def test_peak_throughput_buckets_chunks_by_second():
    a = _output(0.0, 0.2, [0.2, 0.2, 0.2, 0.5], tokens=5)  # chunks at .2 .4 .6 .8 1.3
    b = _output(0.5, 0.1, [0.1, 1.0], tokens=3)  # chunks at .6 .7 1.7
    assert peak_output_throughput([a, b]) == (6.0, 2)
    assert peak_output_throughput([RequestOutput()]) == (0.0, 0)


# ---- SSE and per-chunk timing -----------------------------------------------------------


def test_sse_decoder_handles_split_events_comments_and_crlf():
    decoder = SSEDecoder()
    stream = b': ping\r\n\r\ndata: {"a": 1}\r\n\r\nevent: x\ndata:{"b": "\xc3\xa9"}\n\ndata: [DONE]'
    payloads = []
    for i in range(0, len(stream), 3):  # cut mid-line and mid-character
        payloads += decoder.feed(stream[i : i + 3])
    payloads += decoder.flush()
    assert payloads == ['{"a": 1}', '{"b": "\u00e9"}', "[DONE]"]


def _chunk(text=None, delta=None, usage=None, finish=None):
    choice = {"delta": delta} if delta is not None else {"text": text}
    choice["finish_reason"] = finish
    body = {"choices": [choice] if text is not None or delta is not None else []}
    if usage:
        body["usage"] = usage
    return json.dumps(body)


def test_stream_timer_measures_ttft_itl_and_usage():
    timer = StreamTimer(RequestOutput(start_time=10.0, prompt_len=3), chat=False)
    timer.feed(_chunk(text="Hel"), 10.25)
    timer.feed(_chunk(text=""), 10.30)  # a token that decodes to nothing yet still counts
    timer.feed(_chunk(text="lo", finish="length"), 10.40)
    timer.feed(_chunk(usage={"prompt_tokens": 7, "completion_tokens": 3}), 10.41)
    timer.feed("[DONE]", 10.42)
    out = timer.finish()
    assert out.success and out.generated_text == "Hello"
    assert out.ttft == pytest.approx(0.25) and out.itl == pytest.approx([0.05, 0.10])
    assert out.latency == pytest.approx(0.40)  # the last token, not the usage chunk
    assert (out.prompt_len, out.output_tokens) == (7, 3)


def test_chat_role_chunk_is_not_the_first_token():
    timer = StreamTimer(RequestOutput(start_time=0.0), chat=True)
    timer.feed(_chunk(delta={"role": "assistant", "content": ""}), 0.01)
    timer.feed(_chunk(delta={"content": "Hi"}), 0.20)
    timer.feed(_chunk(delta={"content": "!"}), 0.25)
    out = timer.finish()
    assert out.ttft == pytest.approx(0.20) and out.itl == pytest.approx([0.05])
    empty = StreamTimer(RequestOutput(), chat=False).finish()
    assert not empty.success and "chunk" in empty.error


def test_payloads_follow_the_openai_apis():
    base = dict(api_url="u", model="m", prompt="p", prompt_len=1, output_len=5)
    completion = build_payload(RequestInput(**base, chat=False, ignore_eos=True))
    assert completion["prompt"] == "p" and completion["max_tokens"] == 5
    assert completion["stream"] is True and completion["ignore_eos"] is True
    assert completion["stream_options"] == {"include_usage": True}
    chat = build_payload(RequestInput(**base, chat=True, extra_body={"temperature": 0.0}))
    assert chat["messages"] == [{"role": "user", "content": "p"}]
    assert chat["max_completion_tokens"] == 5 and chat["temperature"] == 0.0
    assert "ignore_eos" not in chat


# ---- report -----------------------------------------------------------------------------


def test_result_block_has_vllm_labels_and_widths():
    o = _output(0.0, 0.1, [0.02, 0.03], tokens=3, prompt_len=32)
    m = calculate_metrics([o, o], 1.25, [99], {"ttft": 500.0}, len)
    lines = report.result_block(m, 1.25, 4.0, 2, True, ["ttft", "tpot", "itl"])
    head = [
        "============ Serving Benchmark Result ============",
        "Successful requests:                     2         ",
        "Failed requests:                         0         ",
        "Maximum request concurrency:             2         ",
        "Request rate configured (RPS):           4.00      ",
        "Benchmark duration (s):                  1.25      ",
        "Total input tokens:                      64        ",
        "Total generated tokens:                  6         ",
        "Request throughput (req/s):              1.60      ",
        "Request goodput (req/s):                 1.60      ",
        "Output token throughput (tok/s):         4.80      ",
        "Peak output token throughput (tok/s):    6.00      ",
        "Peak concurrent requests:                2.00      ",
        "Total token throughput (tok/s):          56.00     ",
        "---------------Time to First Token----------------",
        "Mean TTFT (ms):                          100.00    ",
    ]
    assert lines[: len(head)] == head
    assert "-----Time per Output Token (excl. 1st token)------" in lines
    assert "---------------Inter-token Latency----------------" in lines
    assert "Mean TPOT (ms):                          25.00     " in lines
    assert "P99 ITL (ms):                            30.00     " in lines
    assert not any("E2EL" in line for line in lines)
    assert lines[-1] == "=" * 50 and len(lines) == 14 + 3 * 4 + 1
    plain = report.result_block(m, 1.25, math.inf, None, False, ["e2el"])
    assert not any("goodput" in line or "RPS" in line or "concurrency" in line for line in plain)
    assert "----------------End-to-end Latency----------------" in plain


def test_result_json_keys():
    o = _output(0.0, 0.1, [0.02], tokens=2)
    m = calculate_metrics([o], 1.0, [50, 99.9], {}, len)
    result = report.benchmark_result(m, [o], 1.0, False, ["ttft", "e2el"])
    keys = (
        "duration completed failed total_input_tokens total_output_tokens request_throughput "
        "output_throughput total_token_throughput input_lens output_lens ttfts itls "
        "generated_texts errors max_output_tokens_per_s max_concurrent_requests mean_ttft_ms "
        "median_ttft_ms std_ttft_ms p50_ttft_ms p99.9_ttft_ms p99.9_e2el_ms"
    ).split()
    for key in keys:
        assert key in result, key
    assert result["request_goodput"] is None and "mean_itl_ms" not in result
    name = report.default_result_name("openai", math.inf, 4, "/models/SmolLM2/", "20250101-000000")
    assert name == "openai-infqps-concurrency4-SmolLM2-20250101-000000.json"
