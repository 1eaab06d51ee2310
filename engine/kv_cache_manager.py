"""Which KV blocks each request holds: prefix-cache lookup, allocation, sharing, freeing.

The scheduler talks to this; the block pool below it knows nothing of requests.
"""

from __future__ import annotations

from dataclasses import dataclass

from tandem.engine.block_pool import BlockPool, KVCacheBlock
from tandem.engine.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class PrefixCacheStats:
    num_queries: int = 0  # prompt tokens looked up
    num_hits: int = 0  # of those, tokens found cached


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching, block_size)
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        self.num_cached_blocks: dict[str, int] = {}  # blocks already hashed, per request
        self.stats = PrefixCacheStats()

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """Longest cached prefix of a new request, as (blocks, number of tokens).

        At least one token is always left to compute: its logits are needed.
        """
        if not self.enable_caching or request.sampling_params.prompt_logprobs is not None:
            return [], 0  # prompt logprobs need every prompt position computed
        max_blocks = (request.num_tokens - 1) // self.block_size
        blocks: list[KVCacheBlock] = []
        bs = self.block_size
        for index, block_hash in enumerate(request.block_hashes[:max_blocks]):
            tokens = request.all_token_ids[index * bs : (index + 1) * bs]
            block = self.pool.get_cached_block(block_hash, tokens)
            if block is None:
                break
            blocks.append(block)
        self.stats.num_queries += request.num_tokens
        self.stats.num_hits += len(blocks) * bs
        return blocks, len(blocks) * bs

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        new_computed_blocks: list[KVCacheBlock] | None = None,
    ) -> list[KVCacheBlock] | None:
        """Blocks for ``num_new_tokens`` more tokens; None (nothing changed) if they don't fit.

        ``new_computed_blocks`` are prefix-cache hits (or shared prompt blocks) that the
        request takes a reference on before its new blocks.
        """
        hits = new_computed_blocks or []
        held = self.req_to_blocks.get(request.request_id, [])
        num_computed = request.num_computed_tokens + len(hits) * self.block_size
        num_needed = cdiv(num_computed + num_new_tokens, self.block_size) - len(held) - len(hits)
        # Hits that sit in the free queue stop counting as free once we touch them.
        num_evictable_hits = sum(1 for b in hits if b.ref_cnt == 0)
        if num_needed > self.pool.num_free_blocks - num_evictable_hits:
            return None
        self.pool.touch(hits)
        new_blocks = self.pool.get_new_blocks(max(num_needed, 0))
        blocks = self.req_to_blocks.setdefault(request.request_id, [])
        blocks += hits + new_blocks
        if hits and request.request_id not in self.num_cached_blocks:
            self.num_cached_blocks[request.request_id] = len(hits)
        return new_blocks

    def cache_blocks(self, request: Request, num_computed_tokens: int) -> None:
        """Hash the request's blocks that became full with computed KV."""
        rid = request.request_id
        num_full = min(num_computed_tokens // self.block_size, len(request.block_hashes))
        num_cached = self.num_cached_blocks.get(rid, 0)
        if num_full > num_cached:
            self.pool.cache_full_blocks(
                self.req_to_blocks[rid],
                request.block_hashes,
                request.all_token_ids,
                num_cached,
                num_full,
            )
            self.num_cached_blocks[rid] = num_full

    def free(self, request: Request) -> None:
        blocks = self.req_to_blocks.pop(request.request_id, [])
        self.num_cached_blocks.pop(request.request_id, None)
        self.pool.free_blocks(reversed(blocks))  # tail first: the prefix is evicted last

    def prompt_blocks_to_share(self, owner: Request, request: Request) -> list[KVCacheBlock]:
        """The owner's full prompt blocks that ``request`` (a sibling sample) can reuse."""
        blocks = self.req_to_blocks.get(owner.request_id, [])
        num_shareable = (request.num_tokens - 1) // self.block_size
        if owner.num_computed_tokens < num_shareable * self.block_size:
            return []
        return blocks[:num_shareable]

    def get_block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_to_blocks.get(request_id, [])]

    def usage(self) -> float:
        return self.pool.usage()

    def check_integrity(self) -> None:
        self.pool.check_integrity()
        refs: dict[int, int] = {}
        for blocks in self.req_to_blocks.values():
            for block in blocks:
                refs[block.block_id] = refs.get(block.block_id, 0) + 1
        for block in self.pool.blocks:
            held = refs.get(block.block_id, 0)
            assert block.ref_cnt == held, (
                f"block {block.block_id}: ref_cnt {block.ref_cnt}, held {held}"
            )
