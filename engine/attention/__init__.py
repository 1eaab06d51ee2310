"""Attention backends behind one interface; ``create_attention_backend`` picks one."""

from __future__ import annotations

from tandem.engine.attention.base import AttentionBackend, AttentionMetadata, PrefillSpan


def create_attention_backend(name: str | None, device: str = "cpu") -> AttentionBackend:
    name = name or "torch"
    if name == "torch":
        from tandem.engine.attention.torch_attn import TorchAttentionBackend

        return TorchAttentionBackend()
    raise ValueError(f"attention_backend: unknown backend {name!r} (known: 'torch')")


__all__ = ["AttentionBackend", "AttentionMetadata", "PrefillSpan", "create_attention_backend"]
