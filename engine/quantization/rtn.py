"""Round-to-nearest (RTN) weight quantization: int8 symmetric and int4 asymmetric.

Each group of ``group_size`` consecutive input features of one output row gets its own
scale (int4: and integer zero point), computed from the group's range; codes are the
rounded quotients. No calibration data: what vLLM's quantization fork called
``auto_quant_mode``. The format is the one ``tandem.kernels.quant_reference`` defines.

- int8: ``scale = absmax / 127``, ``code = round(w / scale)`` in [-127, 127].
- int4: the range ``[min(w, 0), max(w, 0)]`` (it holds 0, so zero is exact and the zero
  point stays in [0, 15]) over 15 steps, ``code = round(w / scale) + zero`` in [0, 15].

Either way ``|w - dequantize(code)| <= scale / 2`` up to the rounding of the scale
itself to the weight's dtype (the scale is rounded first and the codes computed from
the rounded scale, so that the bound holds for what is stored).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tandem.engine.quantization.base import QuantizationMethod, QuantizedWeight
from tandem.kernels.quant_reference import dequantize_int4, dequantize_int8


def _groups(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """``weight: [N, K]`` -> float32 ``[N, num_groups, group_size]``, the last group padded
    with zeros (which change neither an absmax nor a range that holds 0)."""
    n, k = weight.shape
    num_groups = -(-k // group_size)
    padded = F.pad(weight.float(), (0, num_groups * group_size - k))
    return padded.view(n, num_groups, group_size)


def _rounded_scale(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The scale as stored: in ``dtype`` and never 0 (an all-zero group gets codes 0)."""
    return value.clamp(min=torch.finfo(dtype).tiny).to(dtype)


def quantize_int8(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight: [N, K]`` -> (``qweight: [N, K] int8``, ``scales: [N, num_groups]``)."""
    n, k = weight.shape
    groups = _groups(weight, group_size)
    scales = _rounded_scale(groups.abs().amax(-1) / 127, weight.dtype)
    codes = torch.round(groups / scales.float()[..., None]).clamp_(-127, 127)
    return codes.to(torch.int8).view(n, -1)[:, :k].contiguous(), scales


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """``codes: [R, K] uint8`` in [0, 15], K even -> ``[R, K // 2]``, even k in the low nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"codes: int4 packing needs an even K, got {tuple(codes.shape)}")
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def quantize_int4(
    weight: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``weight: [N, K]`` (K even) -> (``qweight: [N, K // 2] uint8``,
    ``scales: [N, num_groups]``, ``zeros: [N, num_groups] uint8``)."""
    n, k = weight.shape
    groups = _groups(weight, group_size)
    low = groups.amin(-1).clamp_(max=0)
    high = groups.amax(-1).clamp_(min=0)
    scales = _rounded_scale((high - low) / 15, weight.dtype)
    scale = scales.float()
    zeros = torch.round(-low / scale).clamp_(0, 15)
    codes = (torch.round(groups / scale[..., None]) + zeros[..., None]).clamp_(0, 15)
    codes = codes.to(torch.uint8).view(n, -1)[:, :k]
    return pack_int4(codes).contiguous(), scales, zeros.to(torch.uint8)


class Int8Weight(QuantizedWeight):
    bits = 8

    def __init__(self, weight: torch.Tensor, group_size: int) -> None:
        super().__init__(weight.shape[0], weight.shape[1], group_size)
        qweight, scales = quantize_int8(weight.detach(), group_size)
        self.register_buffer("qweight", qweight)  # [out, in] int8
        self.register_buffer("scales", scales)  # [out, num_groups]

    def dequantize(self, dtype: torch.dtype, rows: torch.Tensor | None = None) -> torch.Tensor:
        tensors = (self.qweight, self.scales)
        if rows is not None:
            tensors = tuple(t[rows] for t in tensors)
        return dequantize_int8(*tensors, self.group_size, dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            from tandem.kernels.quant_matmul import w8a16_matmul

            return w8a16_matmul(x, self.qweight, self.scales, self.group_size)
        return F.linear(x, self.dequantize(x.dtype))


class Int4Weight(QuantizedWeight):
    bits = 4

    def __init__(self, weight: torch.Tensor, group_size: int) -> None:
        super().__init__(weight.shape[0], weight.shape[1], group_size)
        qweight, scales, zeros = quantize_int4(weight.detach(), group_size)
        self.register_buffer("qweight", qweight)  # [out, in // 2] uint8
        self.register_buffer("scales", scales)  # [out, num_groups]
        self.register_buffer("zeros", zeros)  # [out, num_groups] uint8

    def dequantize(self, dtype: torch.dtype, rows: torch.Tensor | None = None) -> torch.Tensor:
        tensors = (self.qweight, self.scales, self.zeros)
        if rows is not None:
            tensors = tuple(t[rows] for t in tensors)
        return dequantize_int4(*tensors, self.group_size, dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            from tandem.kernels.quant_matmul import w4a16_matmul

            return w4a16_matmul(x, self.qweight, self.scales, self.zeros, self.group_size)
        return F.linear(x, self.dequantize(x.dtype))


class Int8RTN(QuantizationMethod):
    name, bits = "int8", 8

    def quantize(self, weight: torch.Tensor) -> QuantizedWeight:
        return Int8Weight(weight, self.group_size)


class Int4RTN(QuantizationMethod):
    name, bits = "int4", 4

    def can_quantize(self, weight: torch.Tensor) -> bool:
        return super().can_quantize(weight) and weight.shape[1] % 2 == 0

    def quantize(self, weight: torch.Tensor) -> QuantizedWeight:
        return Int4Weight(weight, self.group_size)
