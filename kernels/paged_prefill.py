"""Prefill attention: a chunk of query tokens per sequence against its cached prefix in the
paged cache plus, causally, the chunk itself.

What chunked prefill and prefix-cache hits need: sequence s has ``prefix_lens[s]`` tokens
of K/V already in the cache (read through its block table, where they lie) and this step's
``query_start_loc[s + 1] - query_start_loc[s]`` new tokens, whose K/V come from the ``k``
and ``v`` the model just computed. One program per (tile of query tokens, query head,
sequence) runs an online softmax over the prefix pages, then over the chunk up to the
tile's last token.
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
    expect_like_cache,
    expect_range,
    launch_check,
    next_pow2,
)
from tandem.kernels.paged_decode import LOG2E, attend_pages, online_softmax_step, window_start

# Query tokens per program, keys per loop step: a GPU wants 64 x 64 tiles; the interpreter
# takes 16 (tl.dot's smallest), so that small test chunks still span several query tiles.
GPU_TILE, INTERPRETER_TILE = 64, 16


@triton.jit
def _paged_prefill_kernel(
    out_ptr,  # [num_tokens, num_heads, head_dim], strides (stride_ot, stride_oh, 1)
    q_ptr,  # [num_tokens, num_heads, head_dim], strides (stride_qt, stride_qh, 1)
    k_ptr,  # [num_tokens, num_kv_heads, head_dim], strides (stride_kt, stride_kh, 1)
    v_ptr,  # [num_tokens, num_kv_heads, head_dim], strides (stride_vt, stride_vh, 1)
    cache_ptr,  # [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim] contiguous
    tables_ptr,  # [num_seqs, max_blocks] int64 contiguous
    query_start_ptr,  # [num_seqs + 1] int64
    prefix_lens_ptr,  # [num_seqs] int64
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    stride_cache_block, layer_offset, stride_cache_kv,  # checks.cache_offsets
    max_blocks,  # the block tables' row length
    qk_scale, window,  # as attend_pages takes them
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr,  # GROUP: query heads per kv head
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    TILE: tl.constexpr,  # keys per step of the loops, a multiple of BLOCK_SIZE
    USE_WINDOW: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,  # see attend_pages
):  # fmt: skip
    m_tile, head, seq = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    if m_tile * BLOCK_M >= q_len:  # the grid is sized for the longest chunk
        return
    prefix = tl.load(prefix_lens_ptr + seq)
    kv_head = head // GROUP
    m = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)  # query index inside the chunk
    d = tl.arange(0, HEAD_PAD)
    d_mask = d < HEAD_DIM
    q_mask = (m[:, None] < q_len) & d_mask[None, :]
    q_rows = (q_start + m)[:, None]
    q = tl.load(q_ptr + q_rows * stride_qt + head * stride_qh + d[None, :], mask=q_mask)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite: rows may see no key
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], dtype=tl.float32)

    # 1. the cached prefix, positions [0, prefix), all before every query of the chunk
    lo = 0
    if USE_WINDOW:
        lo = window_start(prefix + m_tile * BLOCK_M, window, TILE)
    m_i, l_i, acc = attend_pages(
        q, prefix + m, m_i, l_i, acc, cache_ptr, tables_ptr + seq * max_blocks, lo, prefix,
        kv_head, d, d_mask, stride_cache_block, layer_offset, stride_cache_kv, qk_scale, window,
        NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, TILE, USE_WINDOW, UPCAST, PRECISION,
    )  # fmt: skip

    # 2. the chunk itself, causally: query m sees chunk keys j <= m
    lo = 0
    if USE_WINDOW:
        lo = window_start(m_tile * BLOCK_M, window, TILE)
    hi = tl.minimum(q_len, (m_tile + 1) * BLOCK_M)
    for start in range(lo, hi, TILE):
        j = start + tl.arange(0, TILE)
        valid = j < q_len
        kv_mask = valid[:, None] & d_mask[None, :]
        k_rows = (q_start + j)[:, None]
        k = tl.load(k_ptr + k_rows * stride_kt + kv_head * stride_kh + d[None, :], mask=kv_mask,
                    other=0.0)  # fmt: skip
        v = tl.load(v_ptr + k_rows * stride_vt + kv_head * stride_vh + d[None, :], mask=kv_mask,
                    other=0.0)  # fmt: skip
        if UPCAST:
            k, v = k.to(tl.float32), v.to(tl.float32)
        mask = valid[None, :] & (j[None, :] <= m[:, None])
        if USE_WINDOW:
            mask = mask & (m[:, None] - j[None, :] < window)
        m_i, l_i, acc = online_softmax_step(q, k, v, mask, m_i, l_i, acc, qk_scale, PRECISION)

    l_i = tl.where(l_i > 0, l_i, 1.0)  # padded rows past the chunk saw no key
    out = acc / l_i[:, None]
    o_ptrs = out_ptr + q_rows * stride_ot + head * stride_oh + d[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=q_mask)


def paged_prefill_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]: the chunks' own keys
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    kv_cache: torch.Tensor,  # [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int64: blocks of the cached prefix
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int64: chunk s is rows [qsl[s], qsl[s+1])
    prefix_lens: torch.Tensor,  # [num_seqs] int64: tokens of s already in the cache
    layer_idx: int,
    scale: float,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_dim]; written in place
    max_query_len: int | None = None,  # longest chunk; computed (a device sync) when None
) -> torch.Tensor:
    """Row r = query_start_loc[s] + i (query i of sequence s, at position prefix_lens[s] + i)
    attends to the prefix's keys 0 .. prefix_lens[s] - 1 from the cache and to its chunk's
    keys 0 ..= i from ``k``/``v`` (only those less than ``sliding_window`` positions back,
    when given). The cache is only read: the chunk's K/V need not be in it yet."""
    num_blocks, block_size, num_kv_heads, head_dim, num_heads = expect_attention(
        q, kv_cache, layer_idx, sliding_window
    )
    dev = kv_cache.device
    num_tokens = q.shape[0]
    expect_like_cache(k, "k", (num_tokens, num_kv_heads, head_dim), kv_cache)
    expect_like_cache(v, "v", (num_tokens, num_kv_heads, head_dim), kv_cache)
    expect(query_start_loc, "query_start_loc", (None,), (torch.int64,), contiguous=True,
           device=dev)  # fmt: skip
    num_seqs = query_start_loc.shape[0] - 1
    if num_seqs < 0:
        raise ValueError("query_start_loc: needs num_seqs + 1 >= 1 entries")
    expect(prefix_lens, "prefix_lens", (num_seqs,), (torch.int64,), contiguous=True, device=dev)
    expect(block_tables, "block_tables", (num_seqs, None), (torch.int64,), contiguous=True,
           device=dev)  # fmt: skip
    max_blocks = block_tables.shape[1]
    _check_values(query_start_loc, prefix_lens, block_tables, num_tokens, num_blocks, block_size)
    out = attention_out(out, q)
    if num_seqs == 0 or num_tokens == 0:
        return out
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    upcast = launch_check(_paged_prefill_kernel, kv_cache, "kv_cache")
    # float32 dots without tensor cores: 64 x 64 tiles spill registers (and take a minute
    # to compile), 32 x 32 ones do not
    block_m = INTERPRETER_TILE if upcast else GPU_TILE // (2 if q.dtype == torch.float32 else 1)
    grid = (triton.cdiv(max_query_len, block_m), num_heads, num_seqs)
    _paged_prefill_kernel[grid](
        out, q, k, v, kv_cache, block_tables, query_start_loc, prefix_lens,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        *cache_offsets(kv_cache, layer_idx), max_blocks, scale * LOG2E, sliding_window or 0,
        NUM_KV_HEADS=num_kv_heads, GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, BLOCK_M=block_m, HEAD_PAD=next_pow2(head_dim, 16),
        TILE=max(block_size, 2 * block_m if upcast else block_m),
        USE_WINDOW=sliding_window is not None, UPCAST=upcast, PRECISION=dot_precision(q.dtype),
    )  # fmt: skip
    return out


def _check_values(query_start_loc, prefix_lens, block_tables, num_tokens, num_blocks, bs):
    """Chunks tile the rows in order; each prefix fits its block table (CPU only: on a GPU
    these checks would cost a sync per layer)."""
    if query_start_loc.device.type != "cpu":
        return
    starts = query_start_loc.tolist()
    if starts[0] != 0 or starts[-1] != num_tokens or any(a > b for a, b in zip(starts, starts[1:])):
        raise ValueError(
            f"query_start_loc: must rise from 0 to num_tokens={num_tokens}, got {starts}"
        )
    expect_range(prefix_lens, "prefix_lens", 0, block_tables.shape[1] * bs)
    expect_range(block_tables, "block_tables", 0, num_blocks - 1)
