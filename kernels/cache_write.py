"""Write a step's new keys and values into the paged KV cache, in place.

The first thing an attention layer does each step: token ``i``'s key and value go to slot
``slot_mapping[i]`` (``block_id * block_size + offset``) of layer ``layer_idx`` in the one
cache tensor ``[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from tandem.kernels.checks import (
    cache_offsets,
    expect,
    expect_kv_cache,
    expect_like_cache,
    expect_range,
    launch_check,
    next_pow2,
)


@triton.jit
def _reshape_and_cache_kernel(
    key_ptr,  # [num_tokens, num_kv_heads, head_dim], strides (stride_kt, stride_kh, 1)
    value_ptr,  # [num_tokens, num_kv_heads, head_dim], strides (stride_vt, stride_vh, 1)
    cache_ptr,  # [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim] contiguous
    slot_ptr,  # [num_tokens] int64
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cache_block, layer_offset, stride_cache_kv,  # checks.cache_offsets
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    HEAD_PAD: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token)
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    h = tl.arange(0, HEADS_PAD)
    d = tl.arange(0, HEAD_PAD)
    mask = (h[:, None] < NUM_KV_HEADS) & (d[None, :] < HEAD_DIM)
    key = tl.load(key_ptr + token * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask)
    value = tl.load(value_ptr + token * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
    # the cache's inner two dims are contiguous: [num_kv_heads, head_dim] per slot
    dst = block * stride_cache_block + layer_offset + offset * (NUM_KV_HEADS * HEAD_DIM)
    dst += h[:, None] * HEAD_DIM + d[None, :]
    tl.store(cache_ptr + dst, key, mask=mask)
    tl.store(cache_ptr + dst + stride_cache_kv, value, mask=mask)


def reshape_and_cache(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    kv_cache: torch.Tensor,  # [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64: block_id * block_size + offset
    layer_idx: int,
) -> None:
    """kv_cache[s // block_size, layer_idx, 0 and 1, s % block_size] = key[i], value[i]
    for s = slot_mapping[i]. Slots must be distinct (two tokens never share a slot)."""
    expect_kv_cache(kv_cache, layer_idx)
    num_blocks, _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    dev = kv_cache.device
    expect_like_cache(key, "key", (None, num_kv_heads, head_dim), kv_cache)
    num_tokens = key.shape[0]
    expect_like_cache(value, "value", (num_tokens, num_kv_heads, head_dim), kv_cache)
    expect(slot_mapping, "slot_mapping", (num_tokens,), (torch.int64,), contiguous=True, device=dev)
    expect_range(slot_mapping, "slot_mapping", 0, num_blocks * block_size - 1)
    if num_tokens == 0:
        return
    launch_check(_reshape_and_cache_kernel, kv_cache, "kv_cache")
    _reshape_and_cache_kernel[(num_tokens,)](
        key,
        value,
        kv_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        *cache_offsets(kv_cache, layer_idx),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        HEADS_PAD=next_pow2(num_kv_heads),
        HEAD_PAD=next_pow2(head_dim),
    )
