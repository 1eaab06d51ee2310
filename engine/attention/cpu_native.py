"""The native CPU attention backend: decode rows attend to K/V in place in the paged cache.

Same as the torch backend (cache write, prefill spans) except the decode rows: instead of
gathering every row's blocks into a fresh tensor and running SDPA over it, a C++ op
(``csrc/paged_decode.cpp``) walks each row's block table and reads K and V where they lie,
so decode attention is one pass over the KV bytes. The op is compiled on first use with
the machine's compiler and cached by torch (``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``); ``load_paged_decode()`` returns None where it cannot be.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import pathlib
import platform
import time

import torch
from tandem.engine.attention.base import AttentionMetadata
from tandem.engine.attention.torch_attn import TorchAttentionBackend

logger = logging.getLogger(__name__)

SOURCE = pathlib.Path(__file__).parent / "csrc" / "paged_decode.cpp"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _cpu_tag() -> str:
    """A short tag of this CPU's instruction set: the op is built with -march=native, so a
    torch extensions folder shared between machines must not hand one CPU's build to
    another."""
    flags = platform.machine()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line
                break
    except OSError:
        pass
    return hashlib.sha1(flags.encode()).hexdigest()[:8]


@functools.cache
def load_paged_decode():
    """The compiled op module, or None (with a warning) where it cannot be built."""
    from torch.utils import cpp_extension

    start = time.perf_counter()
    try:
        module = cpp_extension.load(
            name=f"tandem_paged_decode_{_cpu_tag()}",
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
        )
    except Exception as exc:  # no compiler, no ninja, unsupported flags: all mean "fall back"
        logger.warning("native CPU attention unavailable, using the torch backend: %s", exc)
        return None
    logger.info("native CPU attention op ready in %.1f s", time.perf_counter() - start)
    return module


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

    def _decode(self, layer_idx, q, kv_cache, meta: AttentionMetadata, scale, out) -> None:
        nd, tables = meta.num_decodes, meta.decode_block_tables
        paged_decode_attention(
            q[:nd], kv_cache, tables, meta.decode_seq_lens, layer_idx, scale, out[:nd]
        )
