"""Fused CPU layer ops (``csrc/layer_ops.cpp``) behind checked Python wrappers.

Each wrapper checks shapes, dtypes and strides before the call (the C++ side checks only
values that index memory) and has a torch reference of the same meaning: the model's own
layers (``models/layers.py``) and the torch attention backend's cache write. ``available()``
is False where the op cannot be built; ``models/cpu_fused.py`` then leaves a model as is.
"""

from __future__ import annotations

import pathlib

import torch
from tandem.engine.native_build import load_extension

SOURCE = pathlib.Path(__file__).parent / "csrc" / "layer_ops.cpp"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _ops():
    ops = load_extension("tandem_layer_ops", SOURCE)
    if ops is None:
        raise RuntimeError("the native layer ops could not be compiled (see the log)")
    return ops


def available() -> bool:
    return load_extension("tandem_layer_ops", SOURCE) is not None


def _check_rows(name: str, t: torch.Tensor, dtype: torch.dtype, width: int) -> None:
    if t.dim() != 2 or t.shape[1] != width or t.stride(1) != 1 or t.dtype != dtype:
        raise ValueError(
            f"{name}: expected [rows, {width}] {dtype} with a contiguous last dim, got "
            f"{tuple(t.shape)} {t.dtype} strides {t.stride()}"
        )
    if t.device.type != "cpu":
        raise ValueError(f"{name}: expected a CPU tensor, got {t.device}")


def rms_norm(
    x: torch.Tensor,  # [num_rows, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
    residual: torch.Tensor | None = None,  # [num_rows, hidden], updated in place
) -> torch.Tensor:  # [num_rows, hidden], new
    """``RMSNorm(x)``, or with a residual: ``residual += x`` (in place, rounded to the
    dtype) and ``RMSNorm(residual)``."""
    hidden = weight.shape[0]
    _check_rows("x", x, weight.dtype, hidden)
    if weight.dim() != 1 or weight.stride(0) != 1 or weight.dtype not in DTYPES:
        raise ValueError(f"weight: expected a contiguous 1-D {DTYPES} tensor, got {weight.shape}")
    if residual is not None:
        _check_rows("residual", residual, weight.dtype, hidden)
        if residual.shape[0] != x.shape[0]:
            raise ValueError(f"residual: {residual.shape[0]} rows, x has {x.shape[0]}")
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    _ops().rms_norm(x, residual, weight, eps, out)
    return out


def rotary_embedding(
    positions: torch.Tensor,  # [num_tokens] int64
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim], rotated in place
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim], rotated in place
    cos: torch.Tensor,  # [max_positions, rotary_dim / 2] float32
    sin: torch.Tensor,  # [max_positions, rotary_dim / 2] float32
    rotary_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox rotary (rotate halves) of the first ``rotary_dim`` dims of every head."""
    num_tokens, head_dim = q.shape[0], q.shape[-1]
    for name, t in (("q", q), ("k", k)):
        if (
            t.dim() != 3
            or t.shape[0] != num_tokens
            or t.shape[2] != head_dim
            or t.stride(2) != 1
            or t.stride(1) != head_dim
            or t.dtype not in DTYPES
        ):
            raise ValueError(
                f"{name}: expected [{num_tokens}, heads, {head_dim}] with heads and dims "
                f"contiguous, got {tuple(t.shape)} {t.dtype} strides {t.stride()}"
            )
    if k.dtype != q.dtype:
        raise ValueError(f"k: dtype {k.dtype} differs from q's {q.dtype}")
    if rotary_dim % 2 or not 0 < rotary_dim <= min(head_dim, 512):
        raise ValueError(f"rotary_dim: {rotary_dim} must be even and in (0, {head_dim}]")
    half = rotary_dim // 2
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dtype != torch.float32 or t.dim() != 2 or t.shape[1] != half or not t.is_contiguous():
            raise ValueError(f"{name}: expected contiguous float32 [positions, {half}]")
    if positions.dtype != torch.int64 or positions.shape != (num_tokens,):
        raise ValueError(f"positions: expected int64 [{num_tokens}], got {positions.shape}")
    _ops().rotary_embedding(positions.contiguous(), q, k, cos, sin, rotary_dim)
    return q, k


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of ``gate_up: [num_rows, 2 * inter]`` -> ``[num_rows, inter]``."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 or gate_up.stride(1) != 1:
        raise ValueError(
            f"gate_up: expected [rows, 2 * inter] with a contiguous last dim, got "
            f"{tuple(gate_up.shape)} strides {gate_up.stride()}"
        )
    if gate_up.dtype not in DTYPES or gate_up.device.type != "cpu":
        raise ValueError(f"gate_up: expected a CPU tensor of {DTYPES}, got {gate_up.dtype}")
    out = gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)
    _ops().silu_and_mul(gate_up, out)
    return out


def row_argmax(x: torch.Tensor) -> torch.Tensor:
    """Index of each row's largest value, the first of ties (``x.max(-1).indices``) for
    rows without NaN; read in the logits' own dtype, no float copy."""
    if x.dim() != 2 or x.stride(1) != 1 or x.dtype not in DTYPES or x.device.type != "cpu":
        raise ValueError(
            f"x: expected [rows, n] CPU {DTYPES} with a contiguous last dim, got "
            f"{tuple(x.shape)} {x.dtype} strides {x.stride()}"
        )
    out = torch.empty(x.shape[0], dtype=torch.int64)
    if x.shape[1]:
        _ops().row_argmax(x, out)
    return out


def reshape_and_cache(
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    kv_cache: torch.Tensor,  # [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]
    slot_block: torch.Tensor,  # [num_tokens] int64
    slot_offset: torch.Tensor,  # [num_tokens] int64
    layer_idx: int,
) -> None:
    """Write each token's K and V row into its slot of layer ``layer_idx``."""
    if kv_cache.dim() != 6 or not kv_cache.is_contiguous() or kv_cache.device.type != "cpu":
        raise ValueError(f"kv_cache: expected a contiguous 6-dim CPU tensor, got {kv_cache.shape}")
    row_shape = tuple(kv_cache.shape[4:])
    num_tokens = k.shape[0]
    for name, t in (("k", k), ("v", v)):
        if tuple(t.shape) != (num_tokens, *row_shape) or t.dtype != kv_cache.dtype:
            raise ValueError(
                f"{name}: expected [{num_tokens}, {row_shape[0]}, {row_shape[1]}] "
                f"{kv_cache.dtype}, got {tuple(t.shape)} {t.dtype}"
            )
        if t.stride(2) != 1 or t.stride(1) != row_shape[1]:
            raise ValueError(f"{name}: a token's heads and dims must be contiguous")
    for name, t in (("slot_block", slot_block), ("slot_offset", slot_offset)):
        if t.dtype != torch.int64 or t.shape != (num_tokens,) or not t.is_contiguous():
            raise ValueError(f"{name}: expected contiguous int64 [{num_tokens}]")
    _ops().reshape_and_cache(k, v, kv_cache, slot_block, slot_offset, layer_idx)
