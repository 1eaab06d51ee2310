"""Attention backends behind one interface; ``create_attention_backend`` picks one."""

from __future__ import annotations

from tandem.engine.attention.base import AttentionBackend, AttentionMetadata, PrefillSpan

BACKENDS = ("torch", "cpu")


def create_attention_backend(name: str | None, device: str = "cpu") -> AttentionBackend:
    """``name`` None picks 'cpu' on the CPU, else 'torch'. 'cpu' (the native paged decode
    op) falls back to 'torch', with a logged warning, where the op cannot be compiled."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"attention_backend: unknown backend {name!r} (known: {BACKENDS})")
    from tandem.engine.attention.torch_attn import TorchAttentionBackend

    if name == "torch" or (name is None and device != "cpu"):
        return TorchAttentionBackend()
    if device != "cpu":
        raise ValueError(f"attention_backend 'cpu' runs on the CPU only, not on {device!r}")
    from tandem.engine.attention.cpu_native import CpuNativeAttentionBackend, load_paged_decode

    if load_paged_decode() is None:  # the reason is already logged
        return TorchAttentionBackend()
    return CpuNativeAttentionBackend()


__all__ = [
    "BACKENDS",
    "AttentionBackend",
    "AttentionMetadata",
    "PrefillSpan",
    "create_attention_backend",
]
