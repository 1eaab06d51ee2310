"""Argument checks shared by the kernel wrappers, and where a kernel can run.

Every wrapper checks its tensors here before a launch: a Triton kernel reads raw pointers
with the strides it is given, so a wrong shape, dtype or layout would not fail, it would
read the wrong memory. Errors are ``ValueError`` naming the argument.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def expect(
    t: torch.Tensor,
    name: str,
    shape: Sequence[int | None],
    dtypes: Sequence[torch.dtype],
    *,
    contiguous: bool = False,
    device: torch.device | None = None,
) -> None:
    """Raise ValueError naming ``name`` unless ``t`` has ``shape`` (None: any size), one of
    ``dtypes``, a contiguous last dim (or is wholly contiguous) and sits on ``device``."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor, got {type(t).__name__}")
    want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
    if t.dim() != len(shape) or any(s is not None and s != n for s, n in zip(shape, t.shape)):
        raise ValueError(f"{name}: expected shape {want}, got {list(t.shape)}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name}: dtype {t.dtype} not in {tuple(dtypes)}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name}: must be contiguous, got strides {t.stride()}")
    if t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name}: the last dim must be contiguous, got strides {t.stride()}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: on {t.device}, expected {device} (where the other inputs are)")


def expect_same_dtype(t: torch.Tensor, name: str, other: torch.Tensor, other_name: str) -> None:
    if t.dtype != other.dtype:
        raise ValueError(f"{name}: dtype {t.dtype} differs from {other_name}'s {other.dtype}")


def expect_like_cache(
    t: torch.Tensor, name: str, shape: Sequence[int | None], kv_cache: torch.Tensor
) -> None:
    """``expect`` for K/V (or queries) headed for or read beside the cache: ``shape``, a
    float dtype that is the cache's, and the cache's device."""
    expect(t, name, shape, FLOAT_DTYPES, device=kv_cache.device)
    expect_same_dtype(t, name, kv_cache, "kv_cache")


def expect_range(t: torch.Tensor, name: str, low: int, high: int) -> None:
    """Raise unless every value of ``t`` lies in [low, high]. Only checked on the CPU: on a
    GPU the check would cost a device sync per layer; there the caller (the attention
    backend, which builds these tensors from the scheduler's output) is trusted."""
    if t.device.type != "cpu" or t.numel() == 0:
        return
    lo, hi = int(t.min()), int(t.max())
    if lo < low or hi > high:
        raise ValueError(f"{name}: values must lie in [{low}, {high}], got [{lo}, {hi}]")


def launch_check(kernel, t: torch.Tensor, name: str) -> bool:
    """Whether ``kernel`` runs in Triton's interpreter; raise if it cannot run on ``t``'s
    device. Triton decides interpreter or compiler when a kernel is defined, from
    TRITON_INTERPRET, so that variable must be set before ``tandem.kernels``' modules are
    imported."""
    from triton.runtime.interpreter import InterpretedFunction

    interpreted = isinstance(kernel, InterpretedFunction)
    if t.device.type == "cpu" and not interpreted:
        raise ValueError(
            f"{name}: a CPU tensor, but Triton runs on the CPU only in its interpreter: set "
            "TRITON_INTERPRET=1 before tandem.kernels is imported (or pass CUDA tensors)"
        )
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name}: on {t.device}; the kernels run on CUDA (or the interpreter)")
    return interpreted


def next_pow2(n: int, floor: int = 1) -> int:
    """The smallest power of two >= max(n, floor): Triton tiles have power-of-two sizes,
    so odd sizes (head dim 80 or 96, three kv heads) are padded and masked."""
    n = max(n, floor)
    return 1 << (n - 1).bit_length()


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs: exact products ('ieee'), not TF32, so a float32 run matches its
    reference; half types ignore this and take the tensor-core path."""
    return "ieee" if dtype == torch.float32 else "tf32"


def expect_kv_cache(kv_cache: torch.Tensor, layer_idx: int) -> None:
    """The engine's one KV tensor ``[num_blocks, num_layers, 2, block_size, num_kv_heads,
    head_dim]``, contiguous (the kernels compute block and layer offsets from its shape)."""
    expect(kv_cache, "kv_cache", (None, None, 2, None, None, None), FLOAT_DTYPES, contiguous=True)
    if not 0 <= layer_idx < kv_cache.shape[1]:
        raise ValueError(f"layer_idx: {layer_idx} outside [0, {kv_cache.shape[1]})")
    block_size = kv_cache.shape[3]
    if block_size & (block_size - 1):
        raise ValueError(f"kv_cache: block_size {block_size} is not a power of two")


class AttentionShape(NamedTuple):
    """The sizes an attention wrapper reads off its checked ``q`` and ``kv_cache``."""

    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    num_heads: int


def expect_attention(
    q: torch.Tensor,  # [num_rows, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]
    layer_idx: int,
    sliding_window: int | None,
) -> AttentionShape:
    """The checks the decode and prefill wrappers share: the cache, a query of the cache's
    head dim and dtype whose heads group evenly over the kv heads, a window of >= 1 tokens."""
    expect_kv_cache(kv_cache, layer_idx)
    num_blocks, _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    expect_like_cache(q, "q", (None, None, head_dim), kv_cache)
    num_heads = q.shape[1]
    if num_heads % num_kv_heads:
        raise ValueError(f"q: {num_heads} heads is not a multiple of {num_kv_heads} kv heads")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window: must be >= 1 or None, got {sliding_window}")
    return AttentionShape(num_blocks, block_size, num_kv_heads, head_dim, num_heads)


def attention_out(out: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor:
    """``out`` checked to match ``q`` (it is written in place), or a fresh one like it."""
    if out is None:
        out = torch.empty_like(q)
    expect(out, "out", tuple(q.shape), (q.dtype,), device=q.device)
    return out


def cache_offsets(kv_cache: torch.Tensor, layer_idx: int) -> tuple[int, int, int]:
    """The three numbers every kernel uses to address the cache: elements between blocks,
    from a block's start to layer ``layer_idx``'s keys, and from a layer's keys to its
    values. Slot ``o`` of block ``b`` then starts at ``b * stride_block + layer_offset + o *
    num_kv_heads * head_dim`` (the cache is contiguous: ``expect_kv_cache``)."""
    return kv_cache.stride(0), layer_idx * kv_cache.stride(1), kv_cache.stride(2)


def kernels_interpreted() -> bool:
    """Whether this process defined its kernels for Triton's interpreter (TRITON_INTERPRET
    was set when the first kernel module was imported)."""
    from tandem.kernels.cache_write import _reshape_and_cache_kernel
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_reshape_and_cache_kernel, InterpretedFunction)
