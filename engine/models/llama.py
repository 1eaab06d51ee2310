"""Llama (Llama 2/3, SmolLM2): RMSNorm, rotary, grouped-query attention, SwiGLU MLP.

Mistral, Qwen2 and Qwen3 reuse these blocks with a few switches (``qkv_bias``,
``qk_norm``); their files only set them.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from tandem.engine.attention import AttentionBackend, AttentionMetadata
from tandem.engine.models.base import CausalLM
from tandem.engine.models.layers import (
    Attention,
    MergedLinear,
    RMSNorm,
    RotaryEmbedding,
    SiluAndMul,
    load_weights,
    rope_parameters,
)
from torch import nn


def head_dim_of(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


class LlamaAttention(nn.Module):
    def __init__(
        self,
        cfg,
        layer_idx: int,
        backend: AttentionBackend,
        qkv_bias: bool,
        o_bias: bool,
        qk_norm: bool,
    ) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim = head_dim_of(cfg)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.sizes = [q_size, kv_size, kv_size]
        self.qkv_proj = MergedLinear(
            cfg.hidden_size, {"q": q_size, "k": kv_size, "v": kv_size}, qkv_bias
        )
        self.o_proj = nn.Linear(q_size, cfg.hidden_size, bias=o_bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if qk_norm else None
        self.rotary = RotaryEmbedding(
            self.head_dim, cfg.max_position_embeddings, rope_parameters(cfg)
        )
        self.attn = Attention(layer_idx, self.num_heads, self.num_kv_heads, self.head_dim, backend)

    def forward(self, positions, x, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split(self.sizes, dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)  # [num_tokens, num_heads, head_dim]
        k = k.view(-1, self.num_kv_heads, self.head_dim)  # [num_tokens, num_kv_heads, head_dim]
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        return self.o_proj(self.attn(q, k, v, kv_cache, meta))


class LlamaMLP(nn.Module):
    def __init__(self, cfg, bias: bool) -> None:
        super().__init__()
        inter = cfg.intermediate_size
        self.gate_up_proj = MergedLinear(cfg.hidden_size, {"gate": inter, "up": inter}, bias)
        self.down_proj = nn.Linear(inter, cfg.hidden_size, bias=bias)
        if cfg.hidden_act not in ("silu", "swish"):
            raise ValueError(f"hidden_act {cfg.hidden_act!r} is not supported for this model")
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg, layer_idx: int, backend: AttentionBackend, switches: dict) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg, layer_idx, backend, **switches)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg, getattr(cfg, "mlp_bias", False))

    def forward(self, positions, x, residual, kv_cache, meta):
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, kv_cache, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg, backend: AttentionBackend, switches: dict) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(cfg, i, backend, switches) for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids, positions, kv_cache, meta) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None  # x: [num_tokens, hidden]
        for layer in self.layers:
            x, residual = layer(positions, x, residual, kv_cache, meta)
        x, _ = self.norm(x, residual)
        return x


class LlamaForCausalLM(CausalLM):
    qkv_bias: bool | None = None  # None: the config's attention_bias decides
    qk_norm = False

    def __init__(self, cfg, backend: AttentionBackend) -> None:
        super().__init__(cfg)
        attention_bias = getattr(cfg, "attention_bias", False)
        qkv_bias = attention_bias if self.qkv_bias is None else self.qkv_bias
        o_bias = attention_bias if self.qkv_bias is None else False
        switches = dict(qkv_bias=qkv_bias, o_bias=o_bias, qk_norm=self.qk_norm)
        self.model = LlamaModel(cfg, backend, switches)
        self.attach_head(cfg.hidden_size, self.model.embed_tokens)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        renames = [(f".{p}_proj.", ".qkv_proj.", p) for p in "qkv"] + [
            (".gate_proj.", ".gate_up_proj.", "gate"),
            (".up_proj.", ".gate_up_proj.", "up"),
        ]
        return load_weights(self, weights, renames, ("rotary_emb.inv_freq", *self.tied_skip()))
