"""Weight-only quantization at load time; ``create_quantization_method`` picks a method."""

from __future__ import annotations

from tandem.engine.quantization.apply import QuantizationSummary, quantize_model, weight_bytes
from tandem.engine.quantization.base import QuantizationMethod, QuantizedWeight
from tandem.engine.quantization.layers import QuantEmbedding, QuantLinear
from tandem.engine.quantization.rtn import Int4RTN, Int8RTN

METHODS: dict[str, type[QuantizationMethod]] = {"int8": Int8RTN, "int4": Int4RTN}
GROUP_SIZES = (32, 64, 128)


def create_quantization_method(name: str, group_size: int = 128) -> QuantizationMethod:
    """The method called ``name`` ('int8' or 'int4') with groups of ``group_size``."""
    if name not in METHODS:
        raise ValueError(f"quantization: unknown method {name!r} (known: {sorted(METHODS)})")
    if group_size not in GROUP_SIZES:
        raise ValueError(
            f"quantization_group_size: expected one of {GROUP_SIZES}, got {group_size}"
        )
    return METHODS[name](group_size)


__all__ = [
    "GROUP_SIZES",
    "METHODS",
    "QuantEmbedding",
    "QuantLinear",
    "QuantizationMethod",
    "QuantizationSummary",
    "QuantizedWeight",
    "create_quantization_method",
    "quantize_model",
    "weight_bytes",
]
