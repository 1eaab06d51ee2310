"""Decode attention: one query token per sequence against its K/V in the paged cache.

One program per (sequence, kv head) walks the sequence's block table a tile of tokens at a
time and keeps an online softmax, so every K/V byte is read once, where it lies in the
cache. The query heads of a kv head's group are the rows of one tile (grouped-query
attention at any ratio): the group shares each K/V load.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from tandem.kernels.checks import (
    attention_out,
    cache_offsets,
    dot_precision,
    expect,
    expect_attention,
    expect_range,
    launch_check,
    next_pow2,
)

LOG2E = 1.4426950408889634


@triton.jit
def online_softmax_step(q, k, v, mask, m_i, l_i, acc, qk_scale, PRECISION: tl.constexpr):
    """One tile of keys [TILE, HEAD_PAD] into the rows' running max, sum and output;
    masked scores count as -inf."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [rows, TILE]
    s = tl.where(mask, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def window_start(first_pos, window, TILE: tl.constexpr):
    """The first key, rounded down to a tile, that a query at ``first_pos`` or later can see
    when each sees only keys less than ``window`` positions back."""
    lo = tl.maximum(first_pos - window + 1, 0)
    return (lo // TILE) * TILE


@triton.jit
def attend_pages(
    q,  # [rows, HEAD_PAD]: query rows that share kv head ``kv_head``
    q_pos,  # [rows] int: each row's position in the sequence (read only when USE_WINDOW)
    m_i, l_i, acc,  # the rows' running max [rows], sum [rows] and output [rows, HEAD_PAD]
    cache_ptr,  # [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim] contiguous
    table,  # the sequence's row of block ids, int64
    lo, hi,  # keys [lo, hi) of the sequence, lo a multiple of TILE
    kv_head, d, d_mask,  # d = tl.arange(0, HEAD_PAD), d_mask = d < HEAD_DIM
    stride_cache_block, layer_offset, stride_cache_kv,  # checks.cache_offsets
    qk_scale,  # softmax scale * log2(e): the scores are exponentiated with exp2
    window,  # sliding window in tokens; read only when USE_WINDOW
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    TILE: tl.constexpr,  # keys per step, a multiple of BLOCK_SIZE
    USE_WINDOW: tl.constexpr,
    UPCAST: tl.constexpr,  # interpreter: dot in float32 (it cannot multiply bfloat16)
    PRECISION: tl.constexpr,  # tl.dot's input_precision (checks.dot_precision)
):  # fmt: skip
    """The rows' online softmax over the sequence's keys [lo, hi), read a tile at a time
    where they lie in the paged cache (decode: all of them; prefill: the cached prefix)."""
    for start in range(lo, hi, TILE):
        t = start + tl.arange(0, TILE)
        valid = t < hi
        block = tl.load(table + t // BLOCK_SIZE, mask=valid, other=0)
        row = block * stride_cache_block + layer_offset
        row += (t % BLOCK_SIZE) * (NUM_KV_HEADS * HEAD_DIM) + kv_head * HEAD_DIM
        kv_off = row[:, None] + d[None, :]  # [TILE, HEAD_PAD]
        kv_mask = valid[:, None] & d_mask[None, :]
        k = tl.load(cache_ptr + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(cache_ptr + kv_off + stride_cache_kv, mask=kv_mask, other=0.0)
        if UPCAST:
            k, v = k.to(tl.float32), v.to(tl.float32)
        mask = valid[None, :]
        if USE_WINDOW:
            mask = mask & (q_pos[:, None] - t[None, :] < window)
        m_i, l_i, acc = online_softmax_step(q, k, v, mask, m_i, l_i, acc, qk_scale, PRECISION)
    return m_i, l_i, acc


@triton.jit
def _paged_decode_kernel(
    out_ptr,  # [num_seqs, num_heads, head_dim], strides (stride_os, stride_oh, 1)
    q_ptr,  # [num_seqs, num_heads, head_dim], strides (stride_qs, stride_qh, 1)
    cache_ptr,  # [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim] contiguous
    tables_ptr,  # [num_seqs, max_blocks] int64 contiguous
    seq_lens_ptr,  # [num_seqs] int64
    stride_qs, stride_qh, stride_os, stride_oh,
    stride_cache_block, layer_offset, stride_cache_kv,  # checks.cache_offsets
    max_blocks,  # the block tables' row length
    qk_scale, window,  # as attend_pages takes them
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr,  # GROUP: query heads per kv head
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    GROUP_PAD: tl.constexpr,  # >= 16: tl.dot's smallest tile
    HEAD_PAD: tl.constexpr,
    TILE: tl.constexpr,  # tokens per step of the loop, a multiple of BLOCK_SIZE
    USE_WINDOW: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,  # see attend_pages
):  # fmt: skip
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + seq)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_PAD)
    d_mask = d < HEAD_DIM
    q_mask = (g[:, None] < GROUP) & d_mask[None, :]
    heads = kv_head * GROUP + g
    q = tl.load(q_ptr + seq * stride_qs + heads[:, None] * stride_qh + d[None, :], mask=q_mask)
    if UPCAST:
        q = q.to(tl.float32)

    # A finite start (not -inf) keeps exp2(m_i - m_new) defined for padded rows.
    m_i = tl.full([GROUP_PAD], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_PAD], dtype=tl.float32)
    # the query at position seq_len - 1, every row of the group
    q_pos = tl.full([GROUP_PAD], 0, dtype=tl.int64) + (seq_len - 1)
    lo = 0
    if USE_WINDOW:
        lo = window_start(seq_len - 1, window, TILE)
    m_i, l_i, acc = attend_pages(
        q, q_pos, m_i, l_i, acc, cache_ptr, tables_ptr + seq * max_blocks, lo, seq_len,
        kv_head, d, d_mask, stride_cache_block, layer_offset, stride_cache_kv, qk_scale, window,
        NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, TILE, USE_WINDOW, UPCAST, PRECISION,
    )  # fmt: skip

    out = acc / l_i[:, None]
    o_ptrs = out_ptr + seq * stride_os + heads[:, None] * stride_oh + d[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=q_mask)


def paged_decode_attention(
    q: torch.Tensor,  # [num_seqs, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int64
    seq_lens: torch.Tensor,  # [num_seqs] int64, each in [1, max_blocks * block_size]
    layer_idx: int,
    scale: float,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,  # [num_seqs, num_heads, head_dim]; written in place
) -> torch.Tensor:
    """out[i, h] = softmax(scale * q[i, h] . K_i^T) V_i over the first seq_lens[i] tokens of
    sequence i (the last ``sliding_window`` of them when given), token t at
    kv_cache[block_tables[i, t // block_size], layer_idx, 0 or 1, t % block_size,
    h // (num_heads // num_kv_heads)]."""
    num_blocks, block_size, num_kv_heads, head_dim, num_heads = expect_attention(
        q, kv_cache, layer_idx, sliding_window
    )
    dev = kv_cache.device
    num_seqs = q.shape[0]
    expect(block_tables, "block_tables", (num_seqs, None), (torch.int64,), contiguous=True,
           device=dev)  # fmt: skip
    expect(seq_lens, "seq_lens", (num_seqs,), (torch.int64,), contiguous=True, device=dev)
    max_blocks = block_tables.shape[1]
    expect_range(seq_lens, "seq_lens", 1, max_blocks * block_size)
    expect_range(block_tables, "block_tables", 0, num_blocks - 1)
    out = attention_out(out, q)
    if num_seqs == 0:
        return out
    upcast = launch_check(_paged_decode_kernel, kv_cache, "kv_cache")
    group = num_heads // num_kv_heads
    _paged_decode_kernel[(num_seqs, num_kv_heads)](
        out, q, kv_cache, block_tables, seq_lens,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        *cache_offsets(kv_cache, layer_idx), max_blocks, scale * LOG2E, sliding_window or 0,
        NUM_KV_HEADS=num_kv_heads, GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        GROUP_PAD=next_pow2(group, 16), HEAD_PAD=next_pow2(head_dim, 16),
        TILE=max(block_size, 64), USE_WINDOW=sliding_window is not None, UPCAST=upcast,
        PRECISION=dot_precision(q.dtype),
    )  # fmt: skip
    return out
