"""Block pool and KV cache manager: exact block ids, eviction order, reference counts."""

from __future__ import annotations

import pytest
from tandem.engine.block_hash import ROOT_HASH, hash_block, hash_block_tokens
from tandem.engine.block_pool import BlockPool
from tandem.engine.kv_cache_manager import KVCacheManager
from tandem.engine.kv_events import AllCleared, BlockRemoved, BlockStored
from tandem.engine.request import Request
from tandem.engine.sampling_params import SamplingParams

BS = 4


def make_request(rid: str, tokens: list[int], salt: str | None = None) -> Request:
    return Request(
        rid,
        tokens,
        SamplingParams(max_tokens=8),
        max_model_len=1000,
        block_size=BS,
        cache_salt=salt,
    )


def run_prefill(kv: KVCacheManager, request: Request) -> list[int]:
    """Look up the prefix cache, allocate the rest, mark everything computed."""
    hits, num_hit = kv.get_computed_blocks(request)
    assert kv.allocate_slots(request, request.num_tokens - num_hit, hits) is not None
    request.num_computed_tokens = request.num_tokens
    kv.cache_blocks(request, request.num_tokens)
    return kv.get_block_ids(request.request_id)


def test_hash_chain_covers_parent_tokens_and_salt():
    a = hash_block_tokens(list(range(8)), BS)
    assert len(a) == 2 and a[0] == hash_block(None, [0, 1, 2, 3])
    assert a[1] == hash_block(a[0], [4, 5, 6, 7])
    assert hash_block(ROOT_HASH, [0, 1, 2, 3]) == a[0]  # None parent means the root
    assert hash_block_tokens(list(range(8)), BS, cache_salt="s")[0] != a[0]
    assert hash_block_tokens([9, 1, 2, 3, 4, 5, 6, 7], BS)[1] != a[1]  # parent changes child
    # continuing from known parents gives the same tail
    assert (
        hash_block_tokens(list(range(12)), BS, parent_hashes=a)
        == hash_block_tokens(list(range(12)), BS)[2:]
    )


def test_free_queue_order_and_eviction_of_lru_cached_blocks():
    pool = BlockPool(6, enable_caching=True, block_size=BS)
    blocks = pool.get_new_blocks(3)
    assert [b.block_id for b in blocks] == [0, 1, 2]
    assert [b.ref_cnt for b in blocks] == [1, 1, 1]
    pool.free_blocks(reversed(blocks))  # tail first
    assert [b.block_id for b in pool.free_queue] == [3, 4, 5, 2, 1, 0]
    pool.check_integrity()


def test_prefix_hit_shares_blocks_and_counts_references():
    kv = KVCacheManager(10, BS, enable_caching=True)
    a = make_request("a", list(range(10)))  # 2 full blocks + 2 tokens
    assert run_prefill(kv, a) == [0, 1, 2]
    b = make_request("b", list(range(8)) + [99, 98, 97])
    hits, num_hit = kv.get_computed_blocks(b)
    assert [h.block_id for h in hits] == [0, 1] and num_hit == 8
    assert kv.allocate_slots(b, 3, hits) is not None
    assert kv.get_block_ids("b") == [0, 1, 3]
    assert [kv.pool.blocks[i].ref_cnt for i in (0, 1, 2, 3)] == [2, 2, 1, 1]
    kv.check_integrity()
    kv.free(a)
    assert [kv.pool.blocks[i].ref_cnt for i in (0, 1, 2)] == [1, 1, 0]
    kv.free(b)
    kv.check_integrity()
    # free order: [4..9] untouched, then a's tail (2), then b's tail (3), b's prefix (1, 0)
    assert [blk.block_id for blk in kv.pool.free_queue] == [4, 5, 6, 7, 8, 9, 2, 3, 1, 0]


def test_at_least_one_token_is_left_to_compute():
    kv = KVCacheManager(8, BS, enable_caching=True)
    run_prefill(kv, make_request("a", list(range(8))))
    same = make_request("b", list(range(8)))  # identical prompt of exactly 2 blocks
    hits, num_hit = kv.get_computed_blocks(same)
    assert num_hit == 4 and [h.block_id for h in hits] == [0]


def test_eviction_takes_oldest_cached_block_and_emits_events():
    kv = KVCacheManager(4, BS, enable_caching=True)
    kv.pool.emit_events = True
    a = make_request("a", list(range(8)) + [0])  # blocks 0,1 full (cached), block 2 partial
    run_prefill(kv, a)
    stored = kv.pool.take_events()
    assert len(stored) == 1 and isinstance(stored[0], BlockStored)
    assert stored[0].block_hashes == a.block_hashes[:2] and stored[0].parent_block_hash is None
    kv.free(a)
    assert [b.block_id for b in kv.pool.free_queue] == [3, 2, 1, 0]
    c = make_request("c", list(range(100, 116)))  # 4 blocks: evicts cached 1 then 0
    assert kv.allocate_slots(c, 16) is not None
    assert kv.get_block_ids("c") == [3, 2, 1, 0]
    removed = kv.pool.take_events()
    assert [type(e) for e in removed] == [BlockRemoved, BlockRemoved]
    assert [e.block_hashes[0] for e in removed] == [a.block_hashes[1], a.block_hashes[0]]
    assert kv.get_computed_blocks(make_request("d", list(range(9))))[1] == 0
    kv.free(c)
    kv.check_integrity()


def test_allocation_failure_changes_nothing():
    kv = KVCacheManager(3, BS, enable_caching=True)
    a = make_request("a", list(range(9)))
    assert kv.allocate_slots(a, 9) is not None  # 3 blocks
    b = make_request("b", list(range(4)))
    assert kv.allocate_slots(b, 4) is None
    assert kv.get_block_ids("b") == [] and kv.pool.num_free_blocks == 0
    kv.free(a)
    kv.check_integrity()


def test_cached_hit_in_free_queue_does_not_count_as_free():
    kv = KVCacheManager(3, BS, enable_caching=True)
    a = make_request("a", list(range(8)) + [1])
    run_prefill(kv, a)
    kv.free(a)  # blocks 0 and 1 stay cached in the free queue
    b = make_request("b", list(range(8)) + [5, 6, 7, 8, 9])  # hits 2 blocks, needs 2 more
    hits, _ = kv.get_computed_blocks(b)
    assert [h.block_id for h in hits] == [0, 1]
    assert kv.allocate_slots(b, 5, hits) is None  # only 1 block is truly free
    assert kv.pool.num_free_blocks == 3 and all(blk.ref_cnt == 0 for blk in kv.pool.blocks)
    kv.check_integrity()


def test_collision_is_a_miss_not_a_wrong_hit():
    pool = BlockPool(4, enable_caching=True, block_size=BS)
    blocks = pool.get_new_blocks(1)
    fake_hash = b"x" * 32
    pool.cache_full_blocks(blocks, [fake_hash], [1, 2, 3, 4], 0, 1)
    assert pool.get_cached_block(fake_hash, [1, 2, 3, 4]) is blocks[0]
    assert pool.get_cached_block(fake_hash, [1, 2, 3, 5]) is None


def test_reset_prefix_cache_only_when_idle():
    kv = KVCacheManager(4, BS, enable_caching=True)
    kv.pool.emit_events = True
    a = make_request("a", list(range(5)))
    run_prefill(kv, a)
    assert not kv.pool.reset_prefix_cache()
    kv.free(a)
    assert kv.pool.reset_prefix_cache()
    assert isinstance(kv.pool.take_events()[-1], AllCleared)
    assert (
        kv.pool.cached == {} and kv.get_computed_blocks(make_request("b", list(range(5))))[1] == 0
    )
    kv.check_integrity()


def test_caching_disabled_never_hits():
    kv = KVCacheManager(6, BS, enable_caching=False)
    run_prefill(kv, make_request("a", list(range(9))))
    assert kv.get_computed_blocks(make_request("b", list(range(9)))) == ([], 0)
    assert kv.pool.cached == {}


def test_free_twice_is_caught():
    pool = BlockPool(2, enable_caching=False, block_size=BS)
    blocks = pool.get_new_blocks(1)
    pool.free_blocks(blocks)
    with pytest.raises(AssertionError):
        pool.free_blocks(blocks)
