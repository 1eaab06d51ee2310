"""OPT: learned positions (offset by 2), LayerNorm blocks (pre- or post-norm), ReLU MLP.

When ``word_embed_proj_dim`` differs from ``hidden_size`` (opt-350m), the embeddings
live in the smaller width and ``project_in``/``project_out`` map to and from the blocks.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from tandem.engine.attention import AttentionBackend, AttentionMetadata
from tandem.engine.models.base import CausalLM
from tandem.engine.models.layers import Attention, MergedLinear, get_activation, load_weights
from torch import nn

# Row 0 and 1 of OPT's position table are never used: position p reads row p + 2.
_POSITION_OFFSET = 2


class OPTAttention(nn.Module):
    def __init__(self, cfg, layer_idx: int, backend: AttentionBackend) -> None:
        super().__init__()
        hidden = cfg.hidden_size
        self.num_heads = self.num_kv_heads = cfg.num_attention_heads
        self.head_dim = hidden // self.num_heads
        self.scaling = self.head_dim**-0.5
        self.qkv_proj = MergedLinear(
            hidden, {"q": hidden, "k": hidden, "v": hidden}, cfg.enable_bias
        )
        self.out_proj = nn.Linear(hidden, hidden, bias=cfg.enable_bias)
        # q is scaled before attention (as OPT was trained), so attention itself scales by 1.
        self.attn = Attention(
            layer_idx, self.num_heads, self.num_heads, self.head_dim, backend, 1.0
        )

    def forward(self, x, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).view(-1, 3, self.num_heads, self.head_dim).unbind(1)
        # q, k, v: [num_tokens, num_heads, head_dim]
        return self.out_proj(self.attn(q * self.scaling, k, v, kv_cache, meta))


class OPTDecoderLayer(nn.Module):
    def __init__(self, cfg, layer_idx: int, backend: AttentionBackend) -> None:
        super().__init__()
        hidden, affine = cfg.hidden_size, cfg.layer_norm_elementwise_affine
        self.pre_norm = cfg.do_layer_norm_before  # False: norms after each residual (350m)
        self.self_attn = OPTAttention(cfg, layer_idx, backend)
        self.self_attn_layer_norm = nn.LayerNorm(hidden, elementwise_affine=affine)
        self.fc1 = nn.Linear(hidden, cfg.ffn_dim, bias=cfg.enable_bias)
        self.fc2 = nn.Linear(cfg.ffn_dim, hidden, bias=cfg.enable_bias)
        self.final_layer_norm = nn.LayerNorm(hidden, elementwise_affine=affine)
        self.act = get_activation(cfg.activation_function)

    def forward(self, x, kv_cache, meta) -> torch.Tensor:
        h = self.self_attn_layer_norm(x) if self.pre_norm else x
        x = x + self.self_attn(h, kv_cache, meta)
        if not self.pre_norm:
            x = self.self_attn_layer_norm(x)
        h = self.final_layer_norm(x) if self.pre_norm else x
        x = x + self.fc2(self.act(self.fc1(h)))
        return x if self.pre_norm else self.final_layer_norm(x)


class OPTModel(nn.Module):
    def __init__(self, cfg, backend: AttentionBackend) -> None:
        super().__init__()
        hidden, embed_dim = cfg.hidden_size, cfg.word_embed_proj_dim
        self.embed_tokens = nn.Embedding(cfg.vocab_size, embed_dim)
        self.embed_positions = nn.Embedding(cfg.max_position_embeddings + _POSITION_OFFSET, hidden)
        projected = embed_dim != hidden
        self.project_in = nn.Linear(embed_dim, hidden, bias=False) if projected else None
        self.project_out = nn.Linear(hidden, embed_dim, bias=False) if projected else None
        self.layers = nn.ModuleList(
            OPTDecoderLayer(cfg, i, backend) for i in range(cfg.num_hidden_layers)
        )
        has_final_norm = cfg.do_layer_norm_before and not cfg._remove_final_layer_norm
        self.final_layer_norm = (
            nn.LayerNorm(hidden, elementwise_affine=cfg.layer_norm_elementwise_affine)
            if has_final_norm else None
        )  # fmt: skip

    def forward(self, input_ids, positions, kv_cache, meta) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # [num_tokens, word_embed_proj_dim]
        if self.project_in is not None:
            x = self.project_in(x)
        x = x + self.embed_positions(positions + _POSITION_OFFSET)  # [num_tokens, hidden]
        for layer in self.layers:
            x = layer(x, kv_cache, meta)
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        return x if self.project_out is None else self.project_out(x)


class OPTForCausalLM(CausalLM):
    tie_default = True

    def __init__(self, cfg, backend: AttentionBackend) -> None:
        super().__init__(cfg)
        self.model = OPTModel(cfg, backend)
        self.attach_head(cfg.word_embed_proj_dim, self.model.embed_tokens)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        renames = [(f".{p}_proj.", ".qkv_proj.", p) for p in "qkv"]
        return load_weights(self, _renamed(weights), renames, self.tied_skip())


def _renamed(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """``[model.]decoder.X`` (OPTForCausalLM or OPTModel saves) -> ``model.X``."""
    for name, tensor in weights:
        if not name.startswith("lm_head."):
            name = "model." + name.removeprefix("model.").removeprefix("decoder.")
        yield name, tensor
