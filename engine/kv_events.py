"""Events the block pool emits for the KV-block directory (consumed by the publisher)."""

from __future__ import annotations

from dataclasses import dataclass

from tandem.engine.block_hash import BlockHash


@dataclass(frozen=True)
class BlockStored:
    block_hashes: list[BlockHash]  # a chain, parent first
    parent_block_hash: BlockHash | None
    token_ids: list[int]
    block_size: int


@dataclass(frozen=True)
class BlockRemoved:
    block_hashes: list[BlockHash]


@dataclass(frozen=True)
class AllCleared:
    pass


KVCacheEvent = BlockStored | BlockRemoved | AllCleared
