"""The wire: committed stubs match ``proto/tandem.proto`` (regenerated into a temporary
folder by ``scripts/gen_proto.sh``), and engine types survive the trip through protobuf."""

from __future__ import annotations

import ast
import math
import os
import pathlib
import re
import subprocess
import sys

import pytest
from tandem.engine.outputs import CompletionOutput, Logprob, RequestOutput
from tandem.engine.sampling_params import SamplingParams
from tandem.proto import tandem_pb2 as pb
from tandem.services.pd import convert

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO = ROOT / "proto"
STUBS = ("tandem_pb2.py", "tandem_pb2_grpc.py")
# Served once per instance, beside its role's service (never repeated in each).
_INSTANCE_RPCS = {"/tandem.InstanceService/Health", "/tandem.InstanceService/InstanceInfo"}


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("stubs")
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run(["bash", str(ROOT / "scripts/gen_proto.sh"), str(out)], check=True, env=env)
    return out


def _descriptor_bytes(stub: pathlib.Path) -> bytes:
    """The serialized FileDescriptorProto a _pb2.py registers: what the .proto says,
    independent of the protoc version that wrote the file."""
    match = re.search(r"AddSerializedFile\((b'.*?')\)", stub.read_text(), re.S)
    assert match, f"{stub}: no serialized descriptor"
    return ast.literal_eval(match.group(1))


def _method_paths(stub: pathlib.Path) -> set[str]:
    return set(re.findall(r"'(/tandem\.\w+/\w+)'", stub.read_text()))


def _version(stub: pathlib.Path) -> str:
    return re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", stub.read_text()).group(1)


def test_committed_stubs_are_not_stale(regenerated):
    fresh, committed = regenerated / "tandem_pb2.py", PROTO / "tandem_pb2.py"
    assert _descriptor_bytes(fresh) == _descriptor_bytes(committed), (
        "proto/tandem_pb2.py is stale: run scripts/gen_proto.sh"
    )
    assert _descriptor_bytes(committed) == pb.DESCRIPTOR.serialized_pb
    fresh_grpc, committed_grpc = regenerated / "tandem_pb2_grpc.py", PROTO / "tandem_pb2_grpc.py"
    assert _method_paths(fresh_grpc) == _method_paths(committed_grpc)
    paths = _method_paths(committed_grpc)
    assert {"/tandem.DecodeService/Decode", "/tandem.InstanceService/Health"} <= paths
    assert not any(p.endswith(("/Health", "/InstanceInfo")) for p in paths - _INSTANCE_RPCS)
    if _version(fresh_grpc) == _version(committed_grpc):  # same generator: same bytes
        for name in STUBS:
            assert (regenerated / name).read_bytes() == (PROTO / name).read_bytes(), name


def test_stubs_import_inside_the_package():
    text = (PROTO / "tandem_pb2_grpc.py").read_text()
    assert "from tandem.proto import tandem_pb2" in text
    assert not re.search(r"^import tandem_pb2", text, re.M)


def test_sampling_params_round_trip():
    params = SamplingParams(
        n=3,
        temperature=0.7,
        top_p=0.9,
        top_k=5,
        min_p=0.05,
        seed=1234,
        stop=["\n\n", "END"],
        stop_token_ids=[7, 9],
        max_tokens=None,
        min_tokens=2,
        logprobs=3,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        repetition_penalty=1.1,
        ignore_eos=True,
        skip_special_tokens=False,
        include_stop_str_in_output=True,
    )
    wire = convert.sampling_params_to_proto(params).SerializeToString()
    back = convert.sampling_params_from_proto(pb.SamplingParams.FromString(wire))
    for name in convert._PLAIN_FIELDS + convert._OPTIONAL_FIELDS + ("stop", "stop_token_ids"):
        assert getattr(back, name) == getattr(params, name), name
    defaults = convert.sampling_params_from_proto(
        convert.sampling_params_to_proto(SamplingParams())
    )
    assert (defaults.seed, defaults.logprobs, defaults.max_tokens) == (None, None, 16)


def test_bad_values_name_their_field():
    message = convert.sampling_params_to_proto(SamplingParams())
    message.temperature = -1.0
    with pytest.raises(ValueError, match="^temperature"):
        convert.sampling_params_from_proto(message)
    with pytest.raises(ValueError, match="^seed"):
        convert.sampling_params_to_proto(SamplingParams(seed=2**70))
    with pytest.raises(ValueError, match="^prompt_logprobs"):
        convert.sampling_params_to_proto(SamplingParams(prompt_logprobs=1))


def test_kv_transfer_params_round_trip():
    params = {
        "remote_engine_id": "prefill-0",
        "remote_request_id": "req-1",
        "remote_block_ids": [4, 5, 9],
        "num_remote_tokens": 40,
        "remote_host": "127.0.0.1",
        "remote_port": 40123,
    }
    wire = convert.kv_params_to_proto(params).SerializeToString()
    assert convert.kv_params_from_proto(pb.KVTransferParams.FromString(wire)) == params


def test_delta_round_trip_keeps_logprobs_and_stop_reasons():
    position = {5: Logprob(-0.25, 1, " a"), 6: Logprob(-math.inf, 2, None)}
    samples = [
        CompletionOutput(0, " a", [5], -0.25, [position], "stop", "END"),
        CompletionOutput(1, "", [], None, None, "stop", 2),
        CompletionOutput(2, "x", [6], None, None, None, None),
    ]
    prompt = {"prompt_token_ids": [1, 2, 3]}
    output = RequestOutput(
        "r", None, [1, 2, 3], None, samples, False, 16, None, {"queue_time": 0.5}
    )
    wire = convert.delta_to_proto(output).SerializeToString()
    back = convert.delta_from_proto(pb.RequestDelta.FromString(wire), "r", prompt, True)
    assert back.outputs[0] == samples[0]
    assert back.outputs[1].stop_reason == 2 and back.outputs[1].logprobs == []
    assert back.outputs[2].finish_reason is None and back.outputs[2].stop_reason is None
    assert (back.num_cached_tokens, back.metrics, back.finished) == (16, {"queue_time": 0.5}, False)
    assert (
        convert.delta_from_proto(pb.RequestDelta.FromString(wire), "r", prompt, False)
        .outputs[0]
        .logprobs
        is None
    )
