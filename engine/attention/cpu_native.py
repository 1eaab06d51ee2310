"""The native CPU attention backend: decode rows attend to K/V in place in the paged cache.

Same as the torch backend (cache write, prefill spans) except the decode rows: instead of
gathering every row's blocks into a fresh tensor and running SDPA over it, a C++ op
(``csrc/paged_decode.cpp``) walks each row's block table and reads K and V where they lie,
so decode attention is one pass over the KV bytes. The op is compiled on first use with
the machine's compiler and cached by torch (``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``); ``load_paged_decode()`` returns None where it cannot be.
"""

from __future__ import annotations

import pathlib

import torch
from tandem.engine import cpu_ops, envs
from tandem.engine.attention.base import AttentionMetadata
from tandem.engine.attention.torch_attn import TorchAttentionBackend
from tandem.engine.native_build import load_extension

SOURCE = pathlib.Path(__file__).parent / "csrc" / "paged_decode.cpp"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def load_paged_decode():
    """The compiled op module, or None (with a warning) where it cannot be built."""
    return load_extension("tandem_paged_decode", SOURCE)


def paged_decode_attention(
    q: torch.Tensor,  # [num_rows, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_rows, max_blocks] int64
    seq_lens: torch.Tensor,  # [num_rows] int64, each in [1, max_blocks * block_size]
    layer_idx: int,
    scale: float,
    out: torch.Tensor | None = None,  # [num_rows, num_heads, head_dim]; written in place
) -> torch.Tensor:
    """out[i, h] = softmax(scale * q[i, h] . K_i^T) V_i over the first seq_lens[i] tokens of
    row i, token t at kv_cache[block_tables[i, t // block_size], layer_idx, 0 or 1,
    t % block_size, h // group]."""
    op = load_paged_decode()
    if op is None:
        raise RuntimeError("the native paged decode op could not be compiled (see the log)")
    _check(q, kv_cache, block_tables, seq_lens)
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out: expected {tuple(q.shape)} {q.dtype}, last dim contiguous")
    op.paged_decode(q, kv_cache, block_tables, seq_lens, layer_idx, scale, out)
    return out


def _check(q, kv_cache, block_tables, seq_lens) -> None:
    if kv_cache.dim() != 6 or kv_cache.device.type != "cpu" or not kv_cache.is_contiguous():
        raise ValueError(
            f"kv_cache: expected a contiguous 6-dim CPU tensor, got {tuple(kv_cache.shape)} "
            f"on {kv_cache.device}, contiguous={kv_cache.is_contiguous()}"
        )
    if kv_cache.dtype not in DTYPES:
        raise ValueError(f"kv_cache: dtype {kv_cache.dtype} not in {DTYPES}")
    num_kv_heads, head_dim = kv_cache.shape[4], kv_cache.shape[5]
    if q.dim() != 3 or q.shape[2] != head_dim or q.shape[1] % num_kv_heads or q.stride(2) != 1:
        raise ValueError(
            f"q: expected [num_rows, k * {num_kv_heads}, {head_dim}] with a contiguous last "
            f"dim, got {tuple(q.shape)} strides {q.stride()}"
        )
    if q.dtype != kv_cache.dtype:
        raise ValueError(f"q: dtype {q.dtype} differs from kv_cache's {kv_cache.dtype}")
    num_rows = q.shape[0]
    if (
        block_tables.dtype != torch.int64
        or block_tables.dim() != 2
        or block_tables.shape[0] != num_rows
        or not block_tables.is_contiguous()
    ):
        raise ValueError(
            f"block_tables: expected contiguous int64 [{num_rows}, max_blocks], got "
            f"{block_tables.dtype} {tuple(block_tables.shape)}"
        )
    if seq_lens.dtype != torch.int64 or seq_lens.shape != (num_rows,):
        raise ValueError(
            f"seq_lens: expected int64 [{num_rows}], got {seq_lens.dtype} {tuple(seq_lens.shape)}"
        )


class CpuNativeAttentionBackend(TorchAttentionBackend):
    """The torch backend with decode rows computed by the native paged op."""

    name = "cpu"

    def __init__(self) -> None:
        if load_paged_decode() is None:
            raise RuntimeError("the native paged decode op could not be compiled (see the log)")
        # The cache write on the fused op too, where it builds (else the torch one).
        self.fused_cache_write = envs.cpu_fused_ops() and cpu_ops.available()

    def _write_cache(self, layer_idx, k, v, kv_cache, meta: AttentionMetadata) -> None:
        if self.fused_cache_write:
            cpu_ops.reshape_and_cache(k, v, kv_cache, meta.slot_block, meta.slot_offset, layer_idx)
        else:
            super()._write_cache(layer_idx, k, v, kv_cache, meta)

    def _decode(self, layer_idx, q, kv_cache, meta: AttentionMetadata, scale, out) -> None:
        nd, tables = meta.num_decodes, meta.decode_block_tables
        paged_decode_attention(
            q[:nd], kv_cache, tables, meta.decode_seq_lens, layer_idx, scale, out[:nd]
        )
