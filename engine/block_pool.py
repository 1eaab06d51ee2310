"""Fixed-size KV blocks with reference counts and an LRU queue of free blocks.

Eviction order: a block whose reference count drops to zero goes to the tail of the
free queue (a request's blocks are freed tail-first, so its prefix is evicted last);
new blocks are taken from the head. A free block that still holds a hash is "cached":
a prefix hit takes it back out of the queue; a new allocation that reaches it evicts it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tandem.engine.block_hash import BlockHash
from tandem.engine.kv_events import AllCleared, BlockRemoved, BlockStored, KVCacheEvent


class KVCacheBlock:
    __slots__ = ("block_id", "ref_cnt", "block_hash", "token_ids", "prev_free", "next_free")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: BlockHash | None = None
        self.token_ids: tuple[int, ...] | None = None  # confirms a hash hit
        self.prev_free: KVCacheBlock | None = None
        self.next_free: KVCacheBlock | None = None

    def __repr__(self) -> str:
        cached = self.block_hash is not None
        return f"KVCacheBlock(id={self.block_id}, ref={self.ref_cnt}, cached={cached})"


class FreeBlockQueue:
    """Doubly linked list of free blocks: O(1) append, pop-from-head and removal."""

    def __init__(self, blocks: Sequence[KVCacheBlock]) -> None:
        self._head = KVCacheBlock(-1)  # sentinels
        self._tail = KVCacheBlock(-1)
        self._head.next_free, self._tail.prev_free = self._tail, self._head
        self.num_free_blocks = 0
        for block in blocks:
            self.append(block)

    def popleft(self) -> KVCacheBlock:
        block = self._head.next_free
        if block is self._tail or block is None:
            raise RuntimeError("no free KV block left")
        self.remove(block)
        return block

    def remove(self, block: KVCacheBlock) -> None:
        assert block.prev_free is not None and block.next_free is not None
        block.prev_free.next_free = block.next_free
        block.next_free.prev_free = block.prev_free
        block.prev_free = block.next_free = None
        self.num_free_blocks -= 1

    def append(self, block: KVCacheBlock) -> None:
        last = self._tail.prev_free
        assert last is not None
        last.next_free, block.prev_free = block, last
        block.next_free, self._tail.prev_free = self._tail, block
        self.num_free_blocks += 1

    def __iter__(self):
        block = self._head.next_free
        while block is not self._tail and block is not None:
            yield block
            block = block.next_free


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        self.cached: dict[BlockHash, KVCacheBlock] = {}
        self.events: list[KVCacheEvent] = []
        self.emit_events = False  # turned on when someone subscribes

    # -- queries -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return self.free_queue.num_free_blocks

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def get_cached_block(
        self, block_hash: BlockHash, token_ids: Sequence[int]
    ) -> KVCacheBlock | None:
        block = self.cached.get(block_hash)
        if block is None or block.token_ids != tuple(token_ids):
            return None  # a hash collision is a miss, never a wrong answer
        return block

    # -- reference counting ---------------------------------------------------------------
    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Take a reference on blocks found in the prefix cache."""
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_queue.remove(block)
            block.ref_cnt += 1

    def get_new_blocks(self, num_blocks: int) -> list[KVCacheBlock]:
        if num_blocks > self.num_free_blocks:
            raise RuntimeError(f"asked for {num_blocks} blocks, {self.num_free_blocks} free")
        blocks = []
        for _ in range(num_blocks):
            block = self.free_queue.popleft()
            self._evict(block)
            block.ref_cnt = 1
            blocks.append(block)
        return blocks

    def free_blocks(self, blocks_in_eviction_order: Iterable[KVCacheBlock]) -> None:
        for block in blocks_in_eviction_order:
            block.ref_cnt -= 1
            assert block.ref_cnt >= 0, f"block {block.block_id} freed twice"
            if block.ref_cnt == 0:
                self.free_queue.append(block)

    # -- caching -------------------------------------------------------------------------
    def cache_full_blocks(
        self,
        blocks: Sequence[KVCacheBlock],
        block_hashes: Sequence[BlockHash],
        token_ids: Sequence[int],
        num_cached_blocks: int,
        num_full_blocks: int,
    ) -> None:
        """Record hashes of blocks [num_cached_blocks, num_full_blocks) of one request."""
        if not self.enable_caching or num_full_blocks <= num_cached_blocks:
            return
        stored: list[BlockHash] = []
        bs = self.block_size
        for index in range(num_cached_blocks, num_full_blocks):
            block, block_hash = blocks[index], block_hashes[index]
            if block.block_hash is not None or block_hash in self.cached:
                continue  # already cached, or another block holds the same content
            block.block_hash = block_hash
            block.token_ids = tuple(token_ids[index * bs : (index + 1) * bs])
            self.cached[block_hash] = block
            stored.append(block_hash)
        if stored and self.emit_events:
            parent = block_hashes[num_cached_blocks - 1] if num_cached_blocks else None
            tokens = list(token_ids[num_cached_blocks * bs : num_full_blocks * bs])
            self.events.append(BlockStored(stored, parent, tokens, bs))

    def _evict(self, block: KVCacheBlock) -> None:
        if block.block_hash is None:
            return
        del self.cached[block.block_hash]
        if self.emit_events:
            self.events.append(BlockRemoved([block.block_hash]))
        block.block_hash = None
        block.token_ids = None

    def reset_prefix_cache(self) -> bool:
        """Drop every cached hash; refused (False) while any block is in use."""
        if self.num_free_blocks != self.num_blocks:
            return False
        for block in self.blocks:
            block.block_hash = block.token_ids = None
        self.cached.clear()
        if self.emit_events:
            self.events.append(AllCleared())
        return True

    def take_events(self) -> list[KVCacheEvent]:
        events, self.events = self.events, []
        return events

    def check_integrity(self) -> None:
        """free + cached + in use = all blocks, and every index agrees with the blocks."""
        queued = list(self.free_queue)
        assert len(queued) == self.num_free_blocks, "free count out of sync"
        assert len({b.block_id for b in queued}) == len(queued), "block queued twice"
        assert all(b.ref_cnt == 0 for b in queued), "referenced block in free queue"
        in_use = [b for b in self.blocks if b.ref_cnt > 0]
        num_cached = sum(1 for b in queued if b.block_hash is not None)
        num_free = len(queued) - num_cached
        assert num_free + num_cached + len(in_use) == self.num_blocks, "blocks lost"
        for block_hash, block in self.cached.items():
            assert block.block_hash == block_hash, "cache index out of sync"
        assert sum(1 for b in self.blocks if b.block_hash is not None) == len(self.cached)
