"""RMS norm (with the residual add fused in) and rotary embedding, one token per program.

Both are memory-bound elementwise passes the model runs several times per layer; fusing
the residual add into the norm saves one read and one write of the hidden state.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from tandem.kernels.checks import (
    FLOAT_DTYPES,
    expect,
    expect_same_dtype,
    launch_check,
    next_pow2,
)


@triton.jit
def _rms_norm_kernel(
    out_ptr,  # [num_tokens, hidden], strides (stride_out, 1)
    x_ptr,  # [num_tokens, hidden], strides (stride_x, 1)
    residual_ptr,  # [num_tokens, hidden], strides (stride_res, 1); read when HAS_RESIDUAL
    residual_out_ptr,  # [num_tokens, hidden] contiguous: x + residual; written when HAS_RESIDUAL
    weight_ptr,  # [hidden]
    stride_out,
    stride_x,
    stride_res,
    eps,
    HIDDEN: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < HIDDEN
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_res + cols, mask=mask, other=0.0).to(tl.float32)
        # rounded to the activation dtype before the norm, as an unfused add would be
        summed = (x + r).to(residual_out_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * HIDDEN + cols, summed, mask=mask)
        x = summed.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / HIDDEN + eps)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (x * rstd * w).to(out_ptr.dtype.element_ty),
             mask=mask)  # fmt: skip


def rms_norm(
    x: torch.Tensor,  # [num_tokens, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
    residual: torch.Tensor | None = None,  # [num_tokens, hidden]
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x * rsqrt(mean(x^2) + eps) * weight in float32, returned in x's dtype; with a
    residual, first x = x + residual (rounded to x's dtype) and return (out, x)."""
    expect(x, "x", (None, None), FLOAT_DTYPES)
    num_tokens, hidden = x.shape
    expect(weight, "weight", (hidden,), FLOAT_DTYPES, contiguous=True, device=x.device)
    if residual is not None:
        expect(residual, "residual", (num_tokens, hidden), FLOAT_DTYPES, device=x.device)
        expect_same_dtype(residual, "residual", x, "x")
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    residual_out = torch.empty_like(out) if residual is not None else out
    if num_tokens:
        launch_check(_rms_norm_kernel, x, "x")
        _rms_norm_kernel[(num_tokens,)](
            out, x, residual if residual is not None else x, residual_out, weight,
            out.stride(0), x.stride(0), residual.stride(0) if residual is not None else 0, eps,
            HIDDEN=hidden, BLOCK=next_pow2(hidden), HAS_RESIDUAL=residual is not None,
        )  # fmt: skip
    return out if residual is None else (out, residual_out)


@triton.jit
def _rotate_heads(
    src,  # [num_tokens, num_heads, head_dim] at this token's row, strides (., stride_h, 1)
    dst,  # [num_tokens, num_heads, head_dim] contiguous, at this token's row
    stride_h,
    cos,  # [HALF_PAD] float32
    sin,  # [HALF_PAD] float32
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HALF: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    HALF_PAD: tl.constexpr,
    IS_NEOX: tl.constexpr,
):
    h = tl.arange(0, HEADS_PAD)[:, None]
    i = tl.arange(0, HALF_PAD)[None, :]
    mask = (h < NUM_HEADS) & (i < HALF)
    if IS_NEOX:  # pairs (i, i + half): the two halves of the rotary dims
        i1, i2 = i, i + HALF
    else:  # gpt-j: pairs (2i, 2i + 1), interleaved
        i1, i2 = 2 * i, 2 * i + 1
    x1 = tl.load(src + h * stride_h + i1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + h * stride_h + i2, mask=mask, other=0.0).to(tl.float32)
    o1 = x1 * cos[None, :] - x2 * sin[None, :]
    o2 = x2 * cos[None, :] + x1 * sin[None, :]
    tl.store(dst + h * HEAD_DIM + i1, o1.to(dst.dtype.element_ty), mask=mask)
    tl.store(dst + h * HEAD_DIM + i2, o2.to(dst.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    q_out_ptr,  # [num_tokens, num_heads, head_dim] contiguous
    k_out_ptr,  # [num_tokens, num_kv_heads, head_dim] contiguous
    q_ptr,  # [num_tokens, num_heads, head_dim], strides (stride_qt, stride_qh, 1)
    k_ptr,  # [num_tokens, num_kv_heads, head_dim], strides (stride_kt, stride_kh, 1)
    positions_ptr,  # [num_tokens] int64
    cos_ptr,  # [max_positions, rotary_dim // 2] float32 contiguous
    sin_ptr,  # [max_positions, rotary_dim // 2] float32 contiguous
    stride_qt, stride_qh, stride_kt, stride_kh,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    HALF: tl.constexpr, HEADS_PAD: tl.constexpr, KV_HEADS_PAD: tl.constexpr,
    HALF_PAD: tl.constexpr, IS_NEOX: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0)
    pos = tl.load(positions_ptr + token)
    i = tl.arange(0, HALF_PAD)
    cos = tl.load(cos_ptr + pos * HALF + i, mask=i < HALF, other=1.0).to(tl.float32)
    sin = tl.load(sin_ptr + pos * HALF + i, mask=i < HALF, other=0.0).to(tl.float32)
    _rotate_heads(
        q_ptr + token * stride_qt,
        q_out_ptr + token * NUM_HEADS * HEAD_DIM,
        stride_qh,
        cos,
        sin,
        NUM_HEADS,
        HEAD_DIM,
        HALF,
        HEADS_PAD,
        HALF_PAD,
        IS_NEOX,
    )
    _rotate_heads(k_ptr + token * stride_kt, k_out_ptr + token * NUM_KV_HEADS * HEAD_DIM,
                  stride_kh, cos, sin, NUM_KV_HEADS, HEAD_DIM, HALF, KV_HEADS_PAD, HALF_PAD,
                  IS_NEOX)  # fmt: skip


def rotary_embedding(
    positions: torch.Tensor,  # [num_tokens] int64
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    cos: torch.Tensor,  # [max_positions, rotary_dim // 2] float32
    sin: torch.Tensor,  # [max_positions, rotary_dim // 2] float32
    is_neox: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate the first rotary_dim dims of every head of q and k by the angle of each token's
    position (cos/sin rows), computed in float32; the other dims pass through. Neox style
    pairs dim i with i + rotary_dim / 2, gpt-j style pairs 2i with 2i + 1."""
    expect(q, "q", (None, None, None), FLOAT_DTYPES)
    num_tokens, num_heads, head_dim = q.shape
    dev = q.device
    expect(k, "k", (num_tokens, None, head_dim), FLOAT_DTYPES, device=dev)
    expect_same_dtype(k, "k", q, "q")
    expect(positions, "positions", (num_tokens,), (torch.int64,), contiguous=True, device=dev)
    expect(cos, "cos", (None, None), (torch.float32,), contiguous=True, device=dev)
    half = cos.shape[1]
    expect(sin, "sin", tuple(cos.shape), (torch.float32,), contiguous=True, device=dev)
    if not 0 < 2 * half <= head_dim:
        raise ValueError(f"cos: rotary_dim {2 * half} must lie in (0, head_dim={head_dim}]")
    if positions.device.type == "cpu" and num_tokens and int(positions.max()) >= cos.shape[0]:
        raise ValueError(f"positions: {int(positions.max())} >= {cos.shape[0]} cached angles")
    # dims past rotary_dim pass through: then start from copies, the kernel rotates the rest
    fresh = torch.empty_like if 2 * half == head_dim else torch.clone
    q_out = fresh(q, memory_format=torch.contiguous_format)
    k_out = fresh(k, memory_format=torch.contiguous_format)
    if num_tokens:
        launch_check(_rotary_kernel, q, "q")
        num_kv_heads = k.shape[1]
        _rotary_kernel[(num_tokens,)](
            q_out, k_out, q, k, positions, cos, sin,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, HALF=half,
            HEADS_PAD=next_pow2(num_heads), KV_HEADS_PAD=next_pow2(num_kv_heads),
            HALF_PAD=next_pow2(half), IS_NEOX=is_neox,
        )  # fmt: skip
    return q_out, k_out
