"""Triton kernels: 16-bit (or float32) activations times group-wise int8 / int4 weights.

The engine's ``QuantLinear`` (``engine/quantization``) calls ``w8a16_matmul`` and
``w4a16_matmul`` on CUDA; on the CPU it dequantizes with ``quant_reference`` instead. The
storage format is written down in ``quant_reference.py``. The weight is dequantized tile
by tile in registers, so only the packed bytes cross the memory bus: that is where the
speed-up over a 16-bit matmul comes from at small batch (decode), where a matmul is bound
by the bytes of its weight.

Importing this module imports Triton; set ``TRITON_INTERPRET=1`` before importing it to
run the kernels on the CPU (the tests do).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from tandem.kernels.checks import FLOAT_DTYPES, dot_precision, expect, launch_check

SUPPORTED_GROUP_SIZES = (32, 64, 128)


@triton.jit
def _quant_matmul_kernel(
    x_ptr,  # [M, K] activations, row stride stride_xm, unit column stride
    qweight_ptr,  # INT4: [N, K // 2] uint8, two codes per byte; else [N, K] int8
    scales_ptr,  # [N, num_groups] activation dtype
    zeros_ptr,  # [N, num_groups] uint8 zero points (read only when INT4)
    out_ptr,  # [M, N] activation dtype; float32 accumulated atomically when SPLIT_K > 1
    M,
    N,
    K,
    group_size,
    stride_xm,
    stride_qn,
    stride_sn,
    stride_zn,
    stride_om,
    INT4: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,  # interpreter: dot in float32 (it cannot multiply bfloat16)
):
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_mask, n_mask = rm < M, rn < N
    # Split K into SPLIT_K slices of whole BLOCK_K tiles; slice pid_k sums its own.
    k_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k = k0 + rk
        k_mask = k < k_end
        x = tl.load(
            x_ptr + rm[:, None] * stride_xm + k[None, :],
            mask=m_mask[:, None] & k_mask[None, :],
            other=0.0,
        )  # [BLOCK_M, BLOCK_K]
        w_mask = k_mask[:, None] & n_mask[None, :]
        group = (k // group_size)[:, None]
        scale = tl.load(scales_ptr + rn[None, :] * stride_sn + group, mask=w_mask, other=0.0)
        if INT4:
            byte = tl.load(
                qweight_ptr + rn[None, :] * stride_qn + (k // 2)[:, None], mask=w_mask, other=0
            ).to(tl.int32)
            code = (byte >> ((k % 2) * 4)[:, None]) & 0xF
            zero = tl.load(zeros_ptr + rn[None, :] * stride_zn + group, mask=w_mask, other=0)
            w = (code - zero.to(tl.int32)).to(tl.float32) * scale.to(tl.float32)
        else:
            code = tl.load(qweight_ptr + rn[None, :] * stride_qn + k[:, None], mask=w_mask, other=0)
            w = code.to(tl.float32) * scale.to(tl.float32)  # [BLOCK_K, BLOCK_N]
        w = w.to(x.dtype)  # the rounding a 16-bit dot sees, also when upcast below
        if UPCAST:
            x, w = x.to(tl.float32), w.to(tl.float32)
        acc += tl.dot(x, w, input_precision=DOT_PRECISION)
    out_offsets = out_ptr + rm[:, None] * stride_om + rn[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        tl.store(out_offsets, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.atomic_add(out_offsets, acc, mask=out_mask)


def _check_inputs(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bits: int,
) -> tuple[int, int, int]:
    """(M, N, K) once every argument has the shape, dtype, device and strides the kernel
    assumes; otherwise a ValueError naming the argument."""
    expect(x, "x", (None, None), FLOAT_DTYPES)
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"group_size: expected one of {SUPPORTED_GROUP_SIZES}, got {group_size}")
    m, k = x.shape
    if bits == 4 and k % 2:
        raise ValueError(f"x: int4 weights need an even K, got K={k}")
    packed_k, code_dtype = (k // 2, torch.uint8) if bits == 4 else (k, torch.int8)
    expect(qweight, "qweight", (None, packed_k), (code_dtype,), contiguous=True, device=x.device)
    groups = (qweight.shape[0], triton.cdiv(k, group_size))
    expect(scales, "scales", groups, (x.dtype,), contiguous=True, device=x.device)
    if bits == 4:
        if zeros is None:
            raise ValueError("zeros: int4 weights need their zero points")
        expect(zeros, "zeros", groups, (torch.uint8,), contiguous=True, device=x.device)
    return m, groups[0], k


def _pick_split_k(m: int, n: int, k: int, block_n: int, block_k: int, device) -> int:
    """Slices of K for small batches, so enough programs run to fill the GPU."""
    if device.type != "cuda" or m > 16:
        return 1
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count
    tiles = triton.cdiv(n, block_n)
    return max(1, min(triton.cdiv(2 * num_sms, tiles), triton.cdiv(k, block_k), 16))


def quant_matmul(
    x: torch.Tensor,  # [M, K]
    qweight: torch.Tensor,  # bits 4: [N, K // 2] uint8, two codes per byte; 8: [N, K] int8
    scales: torch.Tensor,  # [N, num_groups] in x's dtype
    zeros: torch.Tensor | None,  # bits 4: [N, num_groups] uint8; 8: None
    group_size: int,
    bits: int,
    split_k: int | None = None,
) -> torch.Tensor:
    """``x: [M, K] @ dequantized(W: [N, K]).T -> [M, N]`` in ``x.dtype``; ``bits`` 8 or 4.

    ``split_k`` None picks one from the shape (1 off CUDA); tests force larger values to
    cover the atomic path.
    """
    if bits not in (4, 8):
        raise ValueError(f"bits: expected 4 or 8, got {bits}")
    m, n, k = _check_inputs(x, qweight, scales, zeros, group_size, bits)
    interpreted = launch_check(_quant_matmul_kernel, x, "x")
    block_m = 16 if m <= 16 else 64
    block_n, block_k = 64, 64
    if split_k is None:
        split_k = _pick_split_k(m, n, k, block_n, block_k, x.device)
    if split_k < 1:
        raise ValueError(f"split_k: expected >= 1, got {split_k}")
    out = torch.zeros if split_k > 1 else torch.empty
    out = out((m, n), device=x.device, dtype=torch.float32 if split_k > 1 else x.dtype)
    if m == 0 or n == 0:
        return out.to(x.dtype)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), split_k)
    _quant_matmul_kernel[grid](
        x, qweight, scales, qweight if zeros is None else zeros, out,
        m, n, k, group_size,
        x.stride(0), qweight.stride(0), scales.stride(0),
        0 if zeros is None else zeros.stride(0), out.stride(0),
        INT4=bits == 4, SPLIT_K=split_k, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        DOT_PRECISION=dot_precision(torch.float32 if interpreted else x.dtype),
        UPCAST=interpreted and x.dtype != torch.float32,
    )  # fmt: skip
    return out if split_k == 1 else out.to(x.dtype)


def w8a16_matmul(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int
) -> torch.Tensor:
    """``x: [M, K]`` times the int8 weight ``qweight: [N, K]`` (see quant_reference)."""
    return quant_matmul(x, qweight, scales, None, group_size, bits=8)


def w4a16_matmul(
    x: torch.Tensor,  # [M, K]
    qweight: torch.Tensor,  # [N, K // 2] uint8
    scales: torch.Tensor,  # [N, num_groups]
    zeros: torch.Tensor,  # [N, num_groups] uint8
    group_size: int,
) -> torch.Tensor:
    """``x: [M, K]`` times the int4 weight ``qweight: [N, K // 2]`` (see quant_reference)."""
    return quant_matmul(x, qweight, scales, zeros, group_size, bits=4)


class MatmulTiming(NamedTuple):
    batch: int
    w4a16_ms: float
    bf16_ms: float

    @property
    def speedup(self) -> float:
        return self.bf16_ms / self.w4a16_ms


def benchmark_w4a16(
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16),
    n: int = 4096,
    k: int = 4096,
    group_size: int = 128,
) -> list[MatmulTiming]:
    """``w4a16_matmul`` against a bf16 ``torch.matmul`` of the same shape (CUDA only)."""
    if not torch.cuda.is_available():
        raise RuntimeError("benchmark_w4a16 needs a CUDA device")
    from triton.testing import do_bench

    device = torch.device("cuda")
    weight = torch.randn(n, k, device=device, dtype=torch.bfloat16)
    qweight = torch.randint(0, 256, (n, k // 2), device=device, dtype=torch.uint8)
    groups = (n, triton.cdiv(k, group_size))
    scales = torch.rand(groups, device=device, dtype=torch.bfloat16) / 64
    zeros = torch.full(groups, 8, device=device, dtype=torch.uint8)
    rows = []
    for batch in batch_sizes:
        x = torch.randn(batch, k, device=device, dtype=torch.bfloat16)
        quant_ms = do_bench(lambda x=x: w4a16_matmul(x, qweight, scales, zeros, group_size))
        bf16_ms = do_bench(lambda x=x: torch.matmul(x, weight.t()))
        rows.append(MatmulTiming(batch, quant_ms, bf16_ms))
    return rows
