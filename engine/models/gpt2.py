"""GPT-2: learned absolute positions, pre-LayerNorm blocks, fused c_attn, GELU MLP.

Hugging Face stores GPT-2's projections as Conv1D, whose weight is [in, out]: the
transpose of ``nn.Linear``'s. ``load_weights`` transposes them on the way in, so the
model itself is plain ``nn.Linear``. Checkpoints name tensors with or without the
``transformer.`` prefix (GPT2LMHeadModel vs GPT2Model saves).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch
from tandem.engine.attention import AttentionBackend, AttentionMetadata
from tandem.engine.models.base import CausalLM
from tandem.engine.models.layers import Attention, get_activation, load_weights
from torch import nn

_CONV1D = re.compile(r"\.(c_attn|c_proj|c_fc)\.weight$")
# Causal-mask buffers that old checkpoints saved beside the weights.
_BUFFERS = re.compile(r"\.attn\.(masked_)?bias$")


class GPT2Attention(nn.Module):
    def __init__(self, cfg, layer_idx: int, backend: AttentionBackend) -> None:
        super().__init__()
        hidden = cfg.hidden_size
        self.num_heads = self.num_kv_heads = cfg.num_attention_heads
        self.head_dim = hidden // self.num_heads
        scale = self.head_dim**-0.5 if cfg.scale_attn_weights else 1.0
        if cfg.scale_attn_by_inverse_layer_idx:
            scale /= layer_idx + 1
        self.c_attn = nn.Linear(hidden, 3 * hidden)  # q, k, v side by side
        self.c_proj = nn.Linear(hidden, hidden)
        self.attn = Attention(
            layer_idx, self.num_heads, self.num_heads, self.head_dim, backend, scale
        )

    def forward(self, x, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        qkv = self.c_attn(x).view(-1, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(1)  # each [num_tokens, num_heads, head_dim]
        return self.c_proj(self.attn(q, k, v, kv_cache, meta))


class GPT2MLP(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        inner = cfg.n_inner or 4 * cfg.hidden_size
        self.c_fc = nn.Linear(cfg.hidden_size, inner)
        self.c_proj = nn.Linear(inner, cfg.hidden_size)
        self.act = get_activation(cfg.activation_function)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, cfg, layer_idx: int, backend: AttentionBackend) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon)
        self.self_attn = GPT2Attention(cfg, layer_idx, backend)
        self.ln_2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon)
        self.mlp = GPT2MLP(cfg)

    def forward(self, x, kv_cache, meta) -> torch.Tensor:
        x = x + self.self_attn(self.ln_1(x), kv_cache, meta)
        return x + self.mlp(self.ln_2(x))


class GPT2Model(nn.Module):
    def __init__(self, cfg, backend: AttentionBackend) -> None:
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.wpe = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.layers = nn.ModuleList(
            GPT2Block(cfg, i, backend) for i in range(cfg.num_hidden_layers)
        )
        self.ln_f = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon)

    def forward(self, input_ids, positions, kv_cache, meta) -> torch.Tensor:
        x = self.wte(input_ids) + self.wpe(positions)  # x: [num_tokens, hidden]
        for layer in self.layers:
            x = layer(x, kv_cache, meta)
        return self.ln_f(x)


class GPT2LMHeadModel(CausalLM):
    tie_default = True

    def __init__(self, cfg, backend: AttentionBackend) -> None:
        super().__init__(cfg)
        if getattr(cfg, "add_cross_attention", False):
            raise ValueError("GPT-2 with cross-attention (an encoder-decoder) is not supported")
        self.model = GPT2Model(cfg, backend)
        self.attach_head(cfg.hidden_size, self.model.wte)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_weights(self, self._renamed(weights), renames=[], skip=self.tied_skip())

    @staticmethod
    def _renamed(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """HF names -> this model's, Conv1D weights transposed to [out, in]."""
        for name, tensor in weights:
            if _BUFFERS.search(name):
                continue
            if _CONV1D.search(name):
                tensor = tensor.t()
            if not name.startswith("lm_head."):
                name = "model." + name.removeprefix("transformer.")
                name = re.sub(r"^model\.h\.(\d+)\.attn\.", r"model.layers.\1.self_attn.", name)
                name = re.sub(r"^model\.h\.", "model.layers.", name)
            yield name, tensor
