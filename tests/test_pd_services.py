"""The prefill and decode gRPC services over real gRPC, both in this process so the
loopback connector's hub can move the KV (real processes over UCX and NCCL:
test_pd_transports.py).

Each request goes Prefill -> Decode by hand here, as the router sends it, and must give
colocated ``LLM.generate``'s tokens and text, stop strings included; cancelled and
finished requests leave no running request, lease or used block behind.
"""

from __future__ import annotations

import grpc
import pd_helpers
import pytest
from pd_helpers import wait_idle
from tandem.engine import LLM, SamplingParams
from tandem.proto import tandem_pb2 as pb
from tandem.services.pd.convert import generate_request_to_proto, logprobs_from_proto

PROMPTS = [
    "The capital of France is",
    "Here is a long story about a dragon who lived in the mountains and guarded gold. Then",
    "def add(a, b):",
]
pytestmark = pytest.mark.timeout(120)
# The tiny model, its LLM, the in-process pair, its role stubs and InstanceService stubs.
model_dir, llm, pair, instances, instance_services = pd_helpers.FIXTURES


def tokenize(llm: LLM, text: str) -> dict:
    return {"prompt_token_ids": llm.get_tokenizer()(text).input_ids}


def split_run(instances, prompt: dict, params: SamplingParams, request_id: str):
    """Prefill, then Decode from its first token and KV handle: (text, token ids, messages)."""
    prefill, decode = instances
    message = generate_request_to_proto(request_id, prompt, params)
    first = prefill.Prefill(message, timeout=30)
    request = pb.DecodeRequest(request=message)
    if first.output.finished:
        deltas = [first.output]
    else:
        request.output_token_ids.extend(first.output.outputs[0].token_ids)
        if params.logprobs is not None:
            request.output_logprobs.extend(first.output.outputs[0].logprobs)
        request.kv_transfer_params.CopyFrom(first.kv_transfer_params)
        deltas = list(decode.Decode(request, timeout=60))
    text = "".join(c.text for d in deltas for c in d.outputs)
    ids = [t for d in deltas for c in d.outputs for t in c.token_ids]
    return text, ids, deltas


def test_instance_info_roles_and_layout(instance_services):
    prefill, decode = (s.InstanceInfo(pb.InstanceInfoRequest()) for s in instance_services)
    assert (prefill.role, decode.role) == (pb.ROLE_PREFILL, pb.ROLE_DECODE)
    assert prefill.kv_layout == decode.kv_layout
    layout = decode.kv_layout
    assert (layout.num_layers, layout.num_kv_heads, layout.head_dim) == (2, 2, 16)
    assert (layout.dtype, layout.block_size) == ("float32", 16)
    assert decode.kv_connector == "loopback" and decode.max_model_len == 256
    assert prefill.engine_id != decode.engine_id
    assert all(s.Health(pb.HealthRequest()).serving for s in instance_services)


@pytest.mark.parametrize("stop", [None, "stop-from-output"])
def test_split_run_equals_colocated(instances, instance_services, llm, stop):
    params = SamplingParams(temperature=0, max_tokens=12)
    expected = llm.generate(PROMPTS, params, use_tqdm=False)
    for i, (text, want) in enumerate(zip(PROMPTS, expected)):
        run_params = params
        if stop is not None:  # a stop string the colocated run meets half-way
            full = want.outputs[0].text
            run_params = SamplingParams(
                temperature=0, max_tokens=12, stop=[full[len(full) // 2 :][:3]]
            )
            want = llm.generate(text, run_params, use_tqdm=False)[0]
        got_text, got_ids, deltas = split_run(
            instances, tokenize(llm, text), run_params, f"eq-{stop}-{i}"
        )
        assert got_ids == want.outputs[0].token_ids
        assert got_text == want.outputs[0].text
        assert deltas[-1].finished
        assert (
            deltas[-1].outputs[0].finish_reason
            == {"stop": 1, "length": 2}[want.outputs[0].finish_reason]
        )
    wait_idle(*instance_services)


def test_split_run_carries_the_first_tokens_logprobs(instances, instance_services, llm):
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=2)
    want = llm.generate(PROMPTS[1], params, use_tqdm=False)[0].outputs[0]
    _, ids, deltas = split_run(instances, tokenize(llm, PROMPTS[1]), params, "with-logprobs")
    got = logprobs_from_proto([p for d in deltas for c in d.outputs for p in c.logprobs])
    assert ids == want.token_ids and len(got) == len(ids)
    for position, wanted in zip(got, want.logprobs):
        assert position.keys() == wanted.keys()
        for token, lp in wanted.items():
            assert position[token].logprob == pytest.approx(lp.logprob, abs=1e-4)
            assert (position[token].rank, position[token].decoded_token) == lp[1:]
    cumulative = deltas[-1].outputs[0].cumulative_logprob
    assert cumulative == pytest.approx(want.cumulative_logprob, abs=1e-3)
    wait_idle(*instance_services)


def test_decode_reports_the_transfer_once(instances, instance_services, llm):
    prompt = tokenize(llm, PROMPTS[1])
    _, _, deltas = split_run(
        instances, prompt, SamplingParams(temperature=0, max_tokens=4), "stats"
    )
    reports = [d.kv_transfer for d in deltas if d.HasField("kv_transfer")]
    assert len(reports) == 1 and reports[0].ok
    assert reports[0].num_bytes > 0 and reports[0].seconds >= 0
    info = instance_services[1].InstanceInfo(pb.InstanceInfoRequest())
    assert info.kv_transfer_bytes_total >= reports[0].num_bytes
    wait_idle(*instance_services)


def test_first_token_that_ends_the_request_drops_the_lease(instances, instance_services, llm):
    prompt = tokenize(llm, PROMPTS[0])
    want = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)[0]
    message = generate_request_to_proto("one", prompt, SamplingParams(temperature=0, max_tokens=1))
    first = instances[0].Prefill(message, timeout=30)
    assert first.output.finished and not first.HasField("kv_transfer_params")
    assert list(first.output.outputs[0].token_ids) == want.outputs[0].token_ids
    assert first.output.outputs[0].text == want.outputs[0].text
    assert first.output.outputs[0].finish_reason == pb.FINISH_REASON_LENGTH
    wait_idle(instance_services[0], timeout=1.0)  # no lease to wait for


def test_release_drops_a_lease(instances, instance_services, llm):
    params = SamplingParams(temperature=0, max_tokens=8)
    message = generate_request_to_proto("orphan", tokenize(llm, PROMPTS[1]), params)
    first = instances[0].Prefill(message, timeout=30)
    info = instance_services[0].InstanceInfo(pb.InstanceInfoRequest())
    assert first.HasField("kv_transfer_params") and info.load.num_leased_requests == 1
    instances[0].Release(pb.ReleaseRequest(request_id="orphan"))
    wait_idle(instance_services[0], timeout=2.0)


def test_cancelled_decode_frees_everything(instances, instance_services, llm):
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    message = generate_request_to_proto("cancel-me", tokenize(llm, PROMPTS[1]), params)
    first = instances[0].Prefill(message, timeout=30)
    request = pb.DecodeRequest(request=message, kv_transfer_params=first.kv_transfer_params)
    request.output_token_ids.extend(first.output.outputs[0].token_ids)
    call = instances[1].Decode(request)
    for _ in range(3):
        next(call)
    call.cancel()
    wait_idle(*instance_services)


def test_decode_alone_runs_the_prompt(instances, instance_services, llm):
    params = SamplingParams(temperature=0, max_tokens=10)
    want = llm.generate(PROMPTS[2], params, use_tqdm=False)[0].outputs[0]
    message = generate_request_to_proto("alone", tokenize(llm, PROMPTS[2]), params)
    deltas = list(instances[1].Decode(pb.DecodeRequest(request=message), timeout=60))
    assert [t for d in deltas for t in d.outputs[0].token_ids] == want.token_ids
    assert "".join(d.outputs[0].text for d in deltas) == want.text
    assert not any(d.HasField("kv_transfer") for d in deltas)
    wait_idle(*instance_services)


def test_bad_requests_name_the_field(instances, instance_services, llm):
    message = generate_request_to_proto("bad", tokenize(llm, PROMPTS[0]), SamplingParams())
    message.sampling_params.top_p = 2.0
    for call in (
        instances[0].Prefill,
        lambda m, **kw: list(instances[1].Decode(pb.DecodeRequest(request=m), **kw)),
    ):
        with pytest.raises(grpc.RpcError) as info:
            call(message, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith("top_p")
    message.sampling_params.top_p = 1.0
    message.sampling_params.logprobs = 1  # a first token without its logprobs
    request = pb.DecodeRequest(request=message, output_token_ids=[42])
    with pytest.raises(grpc.RpcError) as info:
        list(instances[1].Decode(request, timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("output_logprobs")
    message.sampling_params.ClearField("logprobs")
    message.sampling_params.n = 2
    with pytest.raises(grpc.RpcError, match="n: a prefill instance runs one sample"):
        instances[0].Prefill(message, timeout=10)
    wait_idle(*instance_services)
