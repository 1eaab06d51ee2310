"""Plain-torch references for the weight-only quantized matmuls in ``quant_matmul.py``.

This module also defines the storage format both sides agree on (``engine/quantization``
produces it, the Triton kernels consume it), for a weight ``W: [N, K]`` (out, in features)
quantized in groups of ``group_size`` consecutive input features, the last group possibly
shorter (``num_groups = ceil(K / group_size)``):

- int8, symmetric: ``qweight: [N, K] int8`` in [-127, 127], ``scales: [N, num_groups]``;
  ``W[n, k] = qweight[n, k] * scales[n, k // group_size]``.
- int4, asymmetric: ``qweight: [N, K // 2] uint8`` holding two 4-bit codes per byte (even
  k in the low nibble, odd k in the high one), ``zeros: [N, num_groups] uint8`` in [0, 15];
  ``W[n, k] = (code[n, k] - zeros[n, g]) * scales[n, g]`` with ``g = k // group_size``.

The dequantize functions here are also the engine's CPU path (dequantize, then
``F.linear``), so they are written to touch each weight element a few times only.
"""

from __future__ import annotations

import torch


def unpack_int4(packed: torch.Tensor, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """``packed: [R, K // 2] uint8`` -> ``[R, K]`` codes in [0, 15], as ``dtype``."""
    # Written straight into the interleaved output: a stack of the two halves costs twice.
    out = torch.empty(*packed.shape, 2, dtype=dtype, device=packed.device)
    out[..., 0] = packed & 0xF
    out[..., 1] = packed >> 4
    return out.flatten(-2)


def _group_views(values: torch.Tensor, group_size: int) -> list[torch.Tensor]:
    """``values: [R, K]`` as views ``[R, num_full_groups, group_size]`` and, when the last
    group is shorter, ``[R, 1, K % group_size]``: per-group arithmetic without a
    ``repeat_interleave`` copy of the scales."""
    k = values.shape[1]
    num_full = k // group_size
    full = num_full * group_size
    views = [values[:, :full].unflatten(1, (num_full, group_size))] if num_full else []
    return views + ([values[:, full:].unsqueeze(1)] if full < k else [])


def _per_group_views(per_group: torch.Tensor, k: int, group_size: int) -> list[torch.Tensor]:
    """``per_group: [R, num_groups]`` as views broadcasting against ``_group_views``."""
    num_full = k // group_size
    views = [per_group[:, :num_full, None]] if num_full else []
    return views + ([per_group[:, num_full:, None]] if num_full * group_size < k else [])


def dequantize_int8(
    qweight: torch.Tensor, scales: torch.Tensor, group_size: int, dtype: torch.dtype
) -> torch.Tensor:
    """``qweight: [R, K] int8``, ``scales: [R, num_groups]`` -> ``[R, K]`` in ``dtype``."""
    # A cast, then an in-place multiply in one dtype: about 5x faster on the CPU than one
    # mixed-dtype multiply into a preallocated output.
    out = qweight.to(dtype)
    for o, s in zip(
        _group_views(out, group_size), _per_group_views(scales.to(dtype), out.shape[1], group_size)
    ):
        o.mul_(s)
    return out


def dequantize_int4(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``qweight: [R, K // 2] uint8``, ``scales``/``zeros: [R, num_groups]`` -> ``[R, K]``."""
    out = unpack_int4(qweight, dtype)
    k = out.shape[1]
    # Codes and zero points are integers below 16: exact in every float dtype, so the
    # subtraction is exact and the product rounds once, as a float32 dequantize would.
    for o, z, s in zip(
        _group_views(out, group_size),
        _per_group_views(zeros.to(dtype), k, group_size),
        _per_group_views(scales.to(dtype), k, group_size),
    ):
        o.sub_(z).mul_(s)
    return out


def w8a16_matmul(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int
) -> torch.Tensor:
    """``x: [M, K]`` times the dequantized ``[N, K]`` int8 weight, transposed -> ``[M, N]``.

    Computed in float32 and cast to ``x.dtype``: the yardstick the kernel is held to.
    """
    weight = dequantize_int8(qweight, scales, group_size, torch.float32)
    return (x.float() @ weight.t()).to(x.dtype)


def w4a16_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
) -> torch.Tensor:
    """``x: [M, K]`` times the dequantized ``[N, K]`` int4 weight, transposed -> ``[M, N]``."""
    weight = dequantize_int4(qweight, scales, zeros, group_size, torch.float32)
    return (x.float() @ weight.t()).to(x.dtype)
