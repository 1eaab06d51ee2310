"""Chained KV-block hashes, shared by the engine's prefix cache and the router.

A full block's hash covers its parent's hash, its token ids and extra keys (the cache
salt, on the first block only: chaining carries it to every later block). The router
hashes a prompt with the same function to ask the directory who holds its prefix.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

BlockHash = bytes  # 32-byte sha256 digest

ROOT_HASH: BlockHash = hashlib.sha256(b"tandem-kv-block-root-v1").digest()


def hash_block(
    parent_hash: BlockHash | None, token_ids: Sequence[int], extra_keys: Sequence[str] = ()
) -> BlockHash:
    """Hash of one full block given its parent's hash (None for the first block)."""
    h = hashlib.sha256(parent_hash or ROOT_HASH)
    h.update(struct.pack(f"<{len(token_ids)}I", *token_ids))
    for key in extra_keys:
        encoded = key.encode()
        h.update(struct.pack("<I", len(encoded)))
        h.update(encoded)
    return h.digest()


def hash_block_tokens(
    token_ids: Sequence[int],
    block_size: int,
    cache_salt: str | None = None,
    parent_hashes: Sequence[BlockHash] = (),
) -> list[BlockHash]:
    """Hashes of every full block of ``token_ids``, continuing after ``parent_hashes``.

    Returns only the new hashes (for blocks ``len(parent_hashes)`` onwards).
    """
    hashes: list[BlockHash] = []
    parent = parent_hashes[-1] if parent_hashes else None
    for index in range(len(parent_hashes), len(token_ids) // block_size):
        start = index * block_size
        extra = (cache_salt,) if index == 0 and cache_salt else ()
        parent = hash_block(parent, token_ids[start : start + block_size], extra)
        hashes.append(parent)
    return hashes


def block_hash_hex(block_hash: BlockHash) -> str:
    """The form stored in Redis and in events on the wire."""
    return block_hash.hex()
