"""Layers shared by the model files: norms, rotary embedding, fused projections, attention.

Models take flat batches: ``x: [num_tokens, hidden]`` with ``positions: [num_tokens]``;
there is no batch axis and no padding.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from tandem.engine.attention import AttentionBackend, AttentionMetadata
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Norm of x, or (norm of x + residual, x + residual) when a residual is given."""
        if residual is not None:
            x = x + residual
            residual = x
        dtype = x.dtype
        out = F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(dtype)
        return out if residual is None else (out, residual)


def rope_parameters(hf_config) -> dict:
    """Rope settings under transformers 5 (``rope_parameters``) or 4 (``rope_theta``)."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    scaling = getattr(hf_config, "rope_scaling", None)
    if scaling:
        params = {**scaling, **params}
    params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def _llama3_inv_freq(inv_freq: torch.Tensor, p: dict) -> torch.Tensor:
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_len = p["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    medium = (wavelen <= old_len / low) & (wavelen >= old_len / high)
    return torch.where(medium, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)


class RotaryEmbedding(nn.Module):
    """Neox-style rotary embedding (rotate halves) over the first ``rotary_dim`` dims."""

    def __init__(self, head_dim: int, max_positions: int, params: dict) -> None:
        super().__init__()
        self.head_dim = head_dim
        rotary_dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
        self.rotary_dim = rotary_dim
        base = float(params["rope_theta"])
        inv_freq = 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
        kind = params["rope_type"]
        if kind == "linear":
            inv_freq = inv_freq / params["factor"]
        elif kind == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, params)
        elif kind != "default":
            raise ValueError(f"rope_type {kind!r} is not supported yet")
        t = torch.arange(max_positions, dtype=torch.float64)
        freqs = torch.outer(t, inv_freq)  # [max_positions, rotary_dim / 2]
        self.register_buffer("cos", freqs.cos().float(), persistent=False)
        self.register_buffer("sin", freqs.sin().float(), persistent=False)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # q: [num_tokens, num_heads, head_dim], k: [num_tokens, num_kv_heads, head_dim]
        cos = self.cos[positions][:, None].to(q.dtype)  # [num_tokens, 1, rotary_dim / 2]
        sin = self.sin[positions][:, None].to(q.dtype)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = self.rotary_dim // 2
        x1, x2 = x[..., :half], x[..., half : self.rotary_dim]
        rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        if self.rotary_dim == self.head_dim:
            return rotated
        return torch.cat((rotated, x[..., self.rotary_dim :]), dim=-1)


class SiluAndMul(nn.Module):
    """SwiGLU's activation: ``silu(gate) * up`` of a fused gate/up projection."""

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        # gate_up: [num_tokens, 2 * intermediate] -> [num_tokens, intermediate]
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


class MergedLinear(nn.Linear):
    """Several projections of the same input as one matmul; shards load by name."""

    def __init__(self, in_features: int, shard_sizes: dict[str, int], bias: bool) -> None:
        super().__init__(in_features, sum(shard_sizes.values()), bias=bias)
        self.shard_offsets: dict[str, tuple[int, int]] = {}
        start = 0
        for name, size in shard_sizes.items():
            self.shard_offsets[name] = (start, size)
            start += size

    def load_shard(self, param: torch.Tensor, loaded: torch.Tensor, shard: str) -> None:
        start, size = self.shard_offsets[shard]
        if loaded.shape[0] != size:
            raise ValueError(f"shard {shard}: expected {size} rows, got {tuple(loaded.shape)}")
        param.data[start : start + size].copy_(loaded)


class Attention(nn.Module):
    """Splits heads, applies rotary, and hands q/k/v to the attention backend."""

    def __init__(self, layer_idx: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 backend: AttentionBackend, scale: float | None = None) -> None:  # fmt: skip
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale if scale is not None else head_dim**-0.5
        self.backend = backend

    def forward(self, q, k, v, kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        # q: [num_tokens, num_heads, head_dim], k/v: [num_tokens, num_kv_heads, head_dim]
        out = self.backend.forward(self.layer_idx, q, k, v, kv_cache, meta, self.scale)
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)


def load_weights(
    module: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    renames: list[tuple[str, str, str | None]],
    skip: tuple[str, ...] = (),
) -> set[str]:
    """Copy checkpoint tensors into ``module``'s parameters.

    ``renames`` holds (checkpoint substring, parameter substring, shard or None); a shard
    name routes the tensor into a slice of a ``MergedLinear``. Names containing any of
    ``skip`` are ignored. Returns the parameter names that were filled.
    """
    params = dict(module.named_parameters())
    loaded: set[str] = set()
    for name, tensor in weights:
        if any(s in name for s in skip):
            continue
        target, shard = name, None
        for old, new, shard_name in renames:
            if old in name:
                target, shard = name.replace(old, new), shard_name
                break
        if target not in params:
            raise ValueError(f"checkpoint tensor {name!r} has no place in the model")
        param = params[target]
        if shard is not None:
            owner = module.get_submodule(target.rsplit(".", 1)[0])
            owner.load_shard(param, tensor.to(param.dtype), shard)
        else:
            if param.shape != tensor.shape:
                raise ValueError(f"{name}: shape {tuple(tensor.shape)} != {tuple(param.shape)}")
            param.data.copy_(tensor)
        loaded.add(target)
    return loaded


_ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    # GPT-2's "gelu_new" is the tanh approximation of GELU.
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}


def get_activation(name: str):
    """The elementwise activation a Hugging Face config names (``activation_function``)."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not supported; known: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def sliding_window_limit(hf_config) -> int | None:
    """The sliding window of a config whose attention uses one, else None.

    The attention backends have no sliding window yet; full attention equals windowed
    attention while a sequence is no longer than the window (a query at position i sees
    keys j with i - j < window), so a model that sets ``max_model_len_limit`` to this
    value stays exact and the engine caps ``max_model_len`` there.
    """
    window = getattr(hf_config, "sliding_window", None)
    if not window or window >= hf_config.max_position_embeddings:
        return None
    # Qwen2/Qwen3 list per-layer kinds (and disable the window unless use_sliding_window).
    layer_types = getattr(hf_config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return int(window)
