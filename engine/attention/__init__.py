"""Attention backends behind one interface; ``create_attention_backend`` picks one."""

from __future__ import annotations

import logging

from tandem.engine.attention.base import AttentionBackend, AttentionMetadata, PrefillSpan

BACKENDS = ("torch", "cpu", "triton")


def create_attention_backend(name: str | None, device: str = "cpu") -> AttentionBackend:
    """``name`` None picks 'cpu' on the CPU, else 'triton' (or 'torch' where Triton is not
    installed). 'cpu' (the native paged decode op) falls back to 'torch', with a logged
    warning, where the op cannot be compiled. 'triton' on the CPU needs TRITON_INTERPRET=1."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"attention_backend: unknown backend {name!r} (known: {BACKENDS})")
    from tandem.engine.attention.torch_attn import TorchAttentionBackend

    if name == "triton" or (name is None and device != "cpu"):
        return _triton_backend(device, fall_back=name is None)
    if name == "torch":
        return TorchAttentionBackend()
    if device != "cpu":
        raise ValueError(f"attention_backend 'cpu' runs on the CPU only, not on {device!r}")
    from tandem.engine.attention.cpu_native import CpuNativeAttentionBackend, load_paged_decode

    if load_paged_decode() is None:  # the reason is already logged
        return TorchAttentionBackend()
    return CpuNativeAttentionBackend()


def _triton_backend(device: str, fall_back: bool) -> AttentionBackend:
    from tandem.engine.attention.triton_attn import TritonAttentionBackend

    try:
        import triton  # noqa: F401  (the kernels import it when first used)
    except ImportError as exc:
        if not fall_back:
            raise ValueError(f"attention_backend 'triton' needs the triton package: {exc}") from exc
        from tandem.engine.attention.torch_attn import TorchAttentionBackend

        logging.getLogger(__name__).warning("triton unavailable, using the torch backend: %s", exc)
        return TorchAttentionBackend()
    return TritonAttentionBackend(device)


__all__ = [
    "BACKENDS",
    "AttentionBackend",
    "AttentionMetadata",
    "PrefillSpan",
    "create_attention_backend",
]
