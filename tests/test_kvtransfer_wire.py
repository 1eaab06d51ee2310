"""The KV wire format, read validation, layouts and transfer state (pure, no processes)."""

from __future__ import annotations

import struct

import pytest
import torch
from tandem.kvtransfer.base import KVTransferParams
from tandem.kvtransfer.common import KVLayout, TransferState
from tandem.kvtransfer.server import BlockServer
from tandem.kvtransfer.wire import (
    HEADER,
    MAGIC,
    MAX_PAYLOAD,
    Done,
    Hello,
    MsgType,
    Read,
    ReadError,
    Refuse,
    WireError,
    block_runs,
    decode,
    encode,
)

LAYOUT = KVLayout("tiny", "float32", 16, 2, 2, 16)


@pytest.mark.parametrize(
    "msg",
    [
        Hello(LAYOUT, b"\x00\x01worker-address"),
        Refuse("KV layout mismatch: dtype"),
        Read(7, 1 << 40, "req-é", [(0, 3), (10, 1)]),
        Read(8, 1, "empty", []),
        ReadError(7, "no lease"),
        Done(7, "req-é"),
    ],
)
def test_round_trip(msg):
    kind, back = decode(encode(msg))
    assert back == msg and kind.name == {
        Hello: "HELLO", Refuse: "REFUSE", Read: "READ", ReadError: "READ_ERROR", Done: "DONE"
    }[type(msg)]  # fmt: skip


def test_hello_ok_is_a_hello_with_another_type():
    kind, back = decode(encode(Hello(LAYOUT, b"x"), MsgType.HELLO_OK))
    assert kind is MsgType.HELLO_OK and back == Hello(LAYOUT, b"x")


def test_every_truncation_is_an_error():
    data = encode(Read(1, 2, "request", [(1, 2), (5, 6)]))
    for cut in range(len(data)):
        with pytest.raises(WireError):
            decode(data[:cut])


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"XXXX" + bytes(8), "bad magic"),
        (HEADER.pack(MAGIC, 9, 1, 0, 0), "version"),
        (HEADER.pack(MAGIC, 1, 99, 0, 0), "unknown message type"),
        (HEADER.pack(MAGIC, 1, 6, 0, MAX_PAYLOAD + 1), "exceeds"),
        (encode(Done(1, "a")) + b"!", "payload is"),
        (HEADER.pack(MAGIC, 1, 6, 0, 12) + struct.pack("!QH", 1, 0) + b"ab", "trailing"),
        (HEADER.pack(MAGIC, 1, 4, 0, 22) + struct.pack("!QQHI", 1, 1, 0, 1 << 20), "num_runs"),
        (HEADER.pack(MAGIC, 1, 3, 0, 4) + b"\x00\x02\xff\xfe", "UTF-8"),
    ],
)
def test_malformed_messages_raise(data, match):
    with pytest.raises(WireError, match=match):
        decode(data)


def test_block_runs_merge_only_what_is_consecutive_on_both_sides():
    assert block_runs([4, 5, 6, 9], [0, 1, 2, 3]) == [(4, 0, 3), (9, 3, 1)]
    assert block_runs([1, 2], [7, 3]) == [(1, 7, 1), (2, 3, 1)]
    assert block_runs([], []) == []
    with pytest.raises(ValueError, match="2 source blocks but 1"):
        block_runs([1, 2], [1])


def test_layout_mismatch_names_the_first_differing_field():
    kv = torch.zeros(4, 2, 2, 16, 2, 16)
    assert KVLayout.of("tiny", kv) == LAYOUT and LAYOUT.mismatch(LAYOUT) is None
    half = KVLayout.of("tiny", kv.to(torch.bfloat16))
    assert "dtype is 'float32' here but 'bfloat16'" in LAYOUT.mismatch(half)
    heads = KVLayout.of("tiny", torch.zeros(4, 2, 2, 16, 4, 8))
    assert "num_kv_heads" in LAYOUT.mismatch(heads)
    with pytest.raises(ValueError, match="kv_cache"):
        KVLayout.of("tiny", torch.zeros(4, 2, 3, 16, 2, 16))


def test_read_is_checked_against_the_lease_and_the_tensor():
    state = TransferState()
    server = BlockServer(None, LAYOUT, torch.zeros(8, 2, 2, 16, 2, 16), state)
    state.leases.add("r", [2, 3, 4], 60.0)
    assert server.check_read(Read(1, 1, "r", [(2, 3)])) is None
    assert "holds no lease" in server.check_read(Read(1, 1, "other", [(2, 1)]))
    assert "outside the 8 KV blocks" in server.check_read(Read(1, 1, "r", [(7, 2)]))
    assert "not leased" in server.check_read(Read(1, 1, "r", [(1, 2)]))
    assert "outside" in server.check_read(Read(1, 1, "r", [(2, 0)]))
    assert "the lease holds 3" in server.check_read(Read(1, 1, "r", [(2, 3), (3, 1)]))
    state.leases.add("expired", [2], -1.0)
    assert "holds no lease" in server.check_read(Read(1, 1, "expired", [(2, 1)]))


def test_transfer_state_reports_each_outcome_once():
    state = TransferState()
    state.leases.add("leased", [1], 60.0)
    for rid in ("ok", "bad", "aborted"):
        state.begin_load(rid)
    assert state.orphan("aborted") and not state.orphan("never-loaded")
    state.finish_load("ok", 100, 0.1, "")
    state.finish_load("bad", 0, 0.1, "refused: block_size")
    state.finish_load("aborted", 100, 0.1, "")  # its blocks were waiting for this
    state.lease_taken("leased")
    state.lease_taken("unknown")
    finished = state.take_finished()
    assert finished.receiving == {"ok"} and finished.failed == {"bad"}
    assert finished.sending == {"aborted", "leased"}
    assert finished.errors == {"bad": "refused: block_size"}
    assert state.take_finished() == (set(), set(), set(), {})
    records = state.drain_records()
    assert [(r.request_id, r.ok) for r in records] == [("ok", True), ("bad", False),
                                                       ("aborted", True)]  # fmt: skip
    assert state.drain_records() == []


def test_transfer_params_carry_the_listener_address():
    params = KVTransferParams("e", "r", [1, 2], 20, "127.0.0.1", 4242)
    data = params.to_dict()
    assert set(data) == {
        "remote_engine_id", "remote_request_id", "remote_block_ids", "num_remote_tokens",
        "remote_host", "remote_port",
    }  # fmt: skip
    assert KVTransferParams.from_dict(data) == params
    with pytest.raises(ValueError, match="remote_port"):
        KVTransferParams.from_dict({**data, "remote_port": 70000})
