"""Scheduler unit tests on tiny specs: a simulated runner samples a fixed token."""

from __future__ import annotations

import time

from tandem.engine.config import (
    CacheConfig,
    EngineConfig,
    EngineRuntime,
    SchedulerConfig,
    TransferConfig,
)
from tandem.engine.request import Request, RequestStatus
from tandem.engine.sampling_params import SamplingParams
from tandem.engine.scheduler import Scheduler
from tandem.engine.scheduler_output import ModelRunnerOutput
from tandem.kvtransfer.base import FinishedTransfers, KVConnectorScheduler

BS = 4
EOS = 2
TOKEN = 7  # what the simulated model always samples


def make_scheduler(
    num_blocks=16, max_seqs=8, budget=64, caching=True, role="both", connector=None, lease=30.0
) -> Scheduler:
    config = EngineConfig(
        cache=CacheConfig(block_size=BS, enable_prefix_caching=caching),
        scheduler=SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget, role=role),
        transfer=TransferConfig(kv_connector="test" if connector else None, kv_lease_seconds=lease),
    )
    runtime = EngineRuntime(
        num_blocks, max_model_len=64, eos_token_ids=frozenset({EOS}), vocab_size=100
    )
    return Scheduler(config, runtime, connector)


def req(rid: str, num_prompt: int, max_tokens=4, first=10, sched=None, **params) -> Request:
    r = Request(
        rid,
        list(range(first, first + num_prompt)),
        SamplingParams(max_tokens=max_tokens, **params),
        max_model_len=64,
        block_size=BS,
    )
    if sched is not None:
        sched.add_request(r)
    return r


def step(s: Scheduler, token=TOKEN, sending=(), receiving=()):
    out = s.schedule()
    sampled = {}
    for rid, n in out.num_scheduled_tokens.items():
        r = s.requests[rid]
        if r.num_computed_tokens + n == r.num_tokens:
            sampled[rid] = token
    transfers = FinishedTransfers(set(sending), set(receiving), set()) if s.connector else None
    results = s.update_from_output(out, ModelRunnerOutput(sampled, finished_transfers=transfers))
    s.kv.check_integrity()
    return out, results


def test_max_num_seqs_and_exact_block_ids():
    s = make_scheduler(max_seqs=2)
    for i in range(3):
        req(f"r{i}", 5, sched=s, first=10 * i)
    out, _ = step(s)
    assert out.num_scheduled_tokens == {"r0": 5, "r1": 5}
    assert [n.block_ids for n in out.new_requests] == [[0, 1], [2, 3]]
    out, _ = step(s)
    assert out.num_scheduled_tokens == {"r0": 1, "r1": 1}  # r2 waits for a seat
    assert [c.new_block_ids for c in out.cached_requests] == [[], []]


def test_chunked_prefill_under_token_budget():
    s = make_scheduler(budget=4)
    r = req("a", 10, sched=s)
    chunks = []
    for _ in range(4):
        out, _ = step(s)
        chunks.append(out.num_scheduled_tokens["a"])
    assert chunks == [4, 4, 2, 1]
    assert r.num_output_tokens == 2  # sampled only after the prompt was complete


def test_decodes_come_before_new_prefills_in_the_budget():
    s = make_scheduler(budget=6)
    req("a", 4, sched=s)
    step(s)
    req("b", 10, sched=s, first=50)
    out, _ = step(s)
    assert out.num_scheduled_tokens == {"a": 1, "b": 5}


def test_stop_conditions():
    s = make_scheduler()
    a = req("a", 3, sched=s, max_tokens=2)  # its EOS lands on the cap: "length", as vLLM
    b = req("b", 3, sched=s, first=30, stop_token_ids=[TOKEN])
    c = req("c", 3, sched=s, first=60, min_tokens=2)
    step(s)
    assert a.status is RequestStatus.RUNNING and b.status is RequestStatus.FINISHED_STOPPED
    assert b.stop_reason == TOKEN
    _, results = step(s, token=EOS)
    assert a.status is RequestStatus.FINISHED_LENGTH
    assert c.status is RequestStatus.FINISHED_STOPPED and c.stop_reason is None  # EOS after min
    assert {r.request_id: r.finish_reason for r in results} == {"a": "length", "c": "stop"}
    assert not s.has_unfinished_requests() and s.kv.pool.num_free_blocks == 16


def test_min_tokens_ignores_eos_before_the_minimum():
    s = make_scheduler()
    r = req("a", 3, sched=s, min_tokens=3, max_tokens=10)
    step(s, token=EOS)
    step(s, token=EOS)
    assert r.status is RequestStatus.RUNNING
    step(s, token=EOS)
    assert r.status is RequestStatus.FINISHED_STOPPED


def test_preemption_by_recompute_requeues_newest_first():
    s = make_scheduler(num_blocks=4, budget=64)
    a = req("a", 7, sched=s, max_tokens=6)  # 2 blocks
    b = req("b", 7, sched=s, max_tokens=6, first=40)  # 2 blocks: the pool is full
    step(s)
    step(s)
    step(s)  # both at 9 tokens: a needs a third block -> b is preempted
    assert b.status is RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert s.waiting[0] is b and s.num_preemptions == 1
    while s.has_unfinished_requests():
        out, _ = step(s)
        assert sum(out.num_scheduled_tokens.values()) > 0, "scheduler stalled"
    assert a.num_output_tokens == 6 and b.num_output_tokens == 6
    assert s.kv.pool.num_free_blocks == 4


def test_abort_in_every_state_returns_blocks():
    s = make_scheduler(budget=4, max_seqs=1)
    req("mid_prefill", 10, sched=s)
    req("waiting", 5, sched=s, first=40)
    step(s)
    s.finish_requests(["mid_prefill", "waiting", "unknown"], RequestStatus.FINISHED_ABORTED)
    assert not s.has_unfinished_requests() and s.kv.pool.num_free_blocks == 16
    out = s.schedule()
    assert {"mid_prefill", "waiting"} <= out.finished_request_ids  # the runner forgets them
    s.kv.check_integrity()


def test_prefix_hit_counts_cached_tokens():
    s = make_scheduler()
    req("a", 9, sched=s, max_tokens=1)
    step(s)
    b = req("b", 9, sched=s, max_tokens=1)
    out, _ = step(s)
    assert b.num_cached_tokens == 8 and out.num_scheduled_tokens == {"b": 1}
    assert out.new_requests[0].block_ids[:2] == [0, 1]


def test_n_siblings_share_prompt_blocks_without_prefix_caching():
    s = make_scheduler(caching=False)
    owner = req("0_x", 9, max_tokens=3)
    sib = Request(
        "1_x",
        list(range(10, 19)),
        SamplingParams(max_tokens=3),
        max_model_len=64,
        block_size=BS,
        prompt_owner=owner,
    )
    s.add_request(owner)
    s.add_request(sib)
    out, _ = step(s)
    assert out.num_scheduled_tokens == {"0_x": 9}  # the sibling waits for the shared prompt
    out, _ = step(s)
    assert out.num_scheduled_tokens == {"0_x": 1, "1_x": 1}  # only the last prompt token
    assert s.kv.get_block_ids("1_x")[:2] == s.kv.get_block_ids("0_x")[:2]
    assert [s.kv.pool.blocks[i].ref_cnt for i in s.kv.get_block_ids("0_x")[:2]] == [2, 2]
    while s.has_unfinished_requests():
        step(s)
    assert s.kv.pool.num_free_blocks == 16


class LeaseConnector(KVConnectorScheduler):
    """Scheduler-side test double: leases every prefill, loads nothing."""

    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        return 0

    def update_state_after_alloc(self, request, block_ids, num_external_tokens):
        pass

    def build_connector_meta(self):
        return None

    def request_finished(self, request, block_ids):
        return True, {"block_ids": block_ids}


def test_prefill_role_leases_blocks_until_sent_or_expired():
    s = make_scheduler(role="prefill", connector=LeaseConnector())
    a = req("a", 6, sched=s, max_tokens=50)
    _, results = step(s)
    assert a.status is RequestStatus.FINISHED_LENGTH and a.num_output_tokens == 1
    assert results[0].kv_transfer_params == {"block_ids": [0, 1]}
    assert s.kv.pool.num_free_blocks == 14 and "a" in s.leased
    step(s, sending=["a"])
    assert s.kv.pool.num_free_blocks == 16 and not s.leased
    expiring = make_scheduler(role="prefill", connector=LeaseConnector(), lease=0.0)
    req("b", 6, sched=expiring)
    step(expiring)
    time.sleep(0.01)
    step(expiring)
    assert expiring.kv.pool.num_free_blocks == 16
