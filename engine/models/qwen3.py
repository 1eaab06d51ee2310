"""Qwen3: Llama blocks with a per-head RMSNorm on q and k before rotary, explicit head_dim.

Biases follow ``attention_bias`` (q/k/v and o alike); a sliding window caps the length as
for Mistral.
"""

from __future__ import annotations

from tandem.engine.attention import AttentionBackend
from tandem.engine.models.llama import LlamaForCausalLM
from tandem.engine.models.mistral import window_cap


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True

    def __init__(self, cfg, backend: AttentionBackend) -> None:
        super().__init__(cfg, backend)
        self.max_model_len_limit = window_cap(cfg)
