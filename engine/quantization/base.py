"""What every weight-only quantization method provides.

A ``QuantizationMethod`` turns a float weight ``[out_features, in_features]`` into a
``QuantizedWeight``: a module holding only buffers (codes, scales, zero points) that can
dequantize itself (the CPU path, and embedding lookups) or multiply activations by
itself without materialising the float weight (the Triton kernels on CUDA). The layers
in ``layers.py`` wrap a ``QuantizedWeight`` as drop-in replacements for ``nn.Linear`` and
``nn.Embedding``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn


class QuantizedWeight(nn.Module, ABC):
    """A ``[out_features, in_features]`` weight held quantized, group-wise along the input
    dimension (groups of ``group_size`` features; the last may be shorter)."""

    bits: int

    def __init__(self, out_features: int, in_features: int, group_size: int) -> None:
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.group_size = group_size

    @abstractmethod
    def dequantize(self, dtype: torch.dtype, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The float weight ``[out_features, in_features]`` in ``dtype``; with ``rows``
        (``[R]`` int64 indices) only those rows, ``[R, in_features]``."""

    @abstractmethod
    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [M, in_features] -> [M, out_features]`` in ``x.dtype``: the Triton kernel on
        CUDA, dequantize plus ``F.linear`` elsewhere."""

    def extra_repr(self) -> str:
        return (
            f"int{self.bits}, out_features={self.out_features}, "
            f"in_features={self.in_features}, group_size={self.group_size}"
        )


class QuantizationMethod(ABC):
    """Round-to-nearest style quantizer of one weight at a time."""

    name: str
    bits: int

    def __init__(self, group_size: int) -> None:
        self.group_size = group_size

    def can_quantize(self, weight: torch.Tensor) -> bool:
        """Whether ``weight`` ([out, in]) fits this method's format."""
        return weight.dim() == 2

    @abstractmethod
    def quantize(self, weight: torch.Tensor) -> QuantizedWeight:
        """Quantize ``weight: [out, in]``; scales take ``weight``'s dtype and device."""
