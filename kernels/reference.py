"""Plain-torch references of the Triton kernels, with the wrappers' signatures (the shapes
are documented once, on the wrappers).

Written for clarity, not speed: one sequence at a time, everything in float32, rounded
once to the output dtype. The kernel tests compare each kernel against its function here,
and each function here once against an independent computation (the engine's torch
attention backend, ``F.scaled_dot_product_attention``, the model layers).
"""

from __future__ import annotations

import torch
from torch import Tensor


def reshape_and_cache(
    key: Tensor, value: Tensor, kv_cache: Tensor, slot_mapping: Tensor, layer_idx: int
) -> None:
    """``cache_write.reshape_and_cache`` (shapes there), by advanced indexing."""
    block_size = kv_cache.shape[3]
    blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
    kv_cache[blocks, layer_idx, 0, offsets] = key
    kv_cache[blocks, layer_idx, 1, offsets] = value


def _paged_kv(kv_cache, block_table, layer_idx, length):
    """The first ``length`` tokens' K and V of one sequence: two [length, kv_heads, dim]."""
    _, _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    blocks = block_table[: -(-length // block_size)]
    kv = kv_cache[blocks, layer_idx]  # [n, 2, block_size, num_kv_heads, head_dim]
    keys = kv[:, 0].reshape(-1, num_kv_heads, head_dim)[:length]
    values = kv[:, 1].reshape(-1, num_kv_heads, head_dim)[:length]
    return keys, values


def _attend(q, keys, values, visible, scale):
    """q [n_q, H, D] over keys/values [n_k, KVH, D] where visible [n_q, n_k]; float32."""
    group = q.shape[1] // keys.shape[1]
    k = keys.float().repeat_interleave(group, dim=1)  # [n_k, H, D]
    v = values.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    scores = scores.masked_fill(~visible[None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def paged_decode_attention(
    q: torch.Tensor,  # [num_seqs, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int64
    seq_lens: torch.Tensor,  # [num_seqs] int64
    layer_idx: int,
    scale: float,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    out = torch.empty_like(q) if out is None else out
    for i, n in enumerate(seq_lens.tolist()):
        keys, values = _paged_kv(kv_cache, block_tables[i], layer_idx, n)
        pos = torch.arange(n)
        window = n if sliding_window is None else sliding_window
        visible = (n - 1 - pos < window)[None]  # [1, n]
        out[i] = _attend(q[i : i + 1], keys, values, visible, scale)[0].to(out.dtype)
    return out


def paged_prefill_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    kv_cache: torch.Tensor,  # [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int64
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int64
    prefix_lens: torch.Tensor,  # [num_seqs] int64
    layer_idx: int,
    scale: float,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,
    max_query_len: int | None = None,
) -> torch.Tensor:
    out = torch.empty_like(q) if out is None else out
    starts = query_start_loc.tolist()
    for s, prefix in enumerate(prefix_lens.tolist()):
        rows = slice(starts[s], starts[s + 1])
        cached_k, cached_v = _paged_kv(kv_cache, block_tables[s], layer_idx, prefix)
        keys = torch.cat([cached_k, k[rows]])  # [prefix + chunk, num_kv_heads, head_dim]
        values = torch.cat([cached_v, v[rows]])
        q_pos = torch.arange(prefix, prefix + starts[s + 1] - starts[s])[:, None]
        k_pos = torch.arange(keys.shape[0])[None]
        visible = k_pos <= q_pos
        if sliding_window is not None:
            visible &= q_pos - k_pos < sliding_window
        out[rows] = _attend(q[rows], keys, values, visible, scale).to(out.dtype)
    return out


def rms_norm(
    x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None
) -> Tensor | tuple[Tensor, Tensor]:
    """``norm_rope.rms_norm`` (shapes there)."""
    if residual is not None:
        x = (x.float() + residual.float()).to(x.dtype)
    xf = x.float()
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return out.to(x.dtype) if residual is None else (out.to(x.dtype), x)


def rotary_embedding(
    positions: Tensor, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, is_neox: bool = True
) -> tuple[Tensor, Tensor]:
    """``norm_rope.rotary_embedding`` (shapes there)."""
    c, s = cos[positions][:, None], sin[positions][:, None]  # [num_tokens, 1, half]
    half = cos.shape[1]

    def rotate(x):
        x = x.float()
        rot, rest = x[..., : 2 * half], x[..., 2 * half :]
        if is_neox:
            x1, x2 = rot[..., :half], rot[..., half:]
            rot = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
        else:
            x1, x2 = rot[..., 0::2], rot[..., 1::2]
            rot = torch.stack([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).flatten(-2)
        return torch.cat([rot, rest], dim=-1)

    return rotate(q).to(q.dtype), rotate(k).to(k.dtype)
