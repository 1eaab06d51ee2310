"""Triton kernels for the GPU path, each beside a plain-torch reference (``reference.py``).

Names resolve lazily, so importing ``tandem.kernels`` does not import Triton: Triton reads
TRITON_INTERPRET when a kernel is defined, and a CPU run (tests, ``--attention-backend
triton`` on CPU) must set it before the first kernel module loads.
"""

from __future__ import annotations

import importlib

_MODULES = {
    "reshape_and_cache": "cache_write",
    "paged_decode_attention": "paged_decode",
    "paged_prefill_attention": "paged_prefill",
    "rms_norm": "norm_rope",
    "rotary_embedding": "norm_rope",
    "w8a16_matmul": "quant_matmul",
    "w4a16_matmul": "quant_matmul",
}

__all__ = sorted(_MODULES)


def __getattr__(name: str):
    if name in _MODULES:
        module = importlib.import_module(f"{__name__}.{_MODULES[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
