"""Qwen2: Llama blocks with biases on q/k/v (none on o_proj), embeddings tied when configured.

A sliding window (``use_sliding_window``) caps the length as for Mistral.
"""

from __future__ import annotations

from tandem.engine.attention import AttentionBackend
from tandem.engine.models.llama import LlamaForCausalLM
from tandem.engine.models.mistral import window_cap


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True

    def __init__(self, cfg, backend: AttentionBackend) -> None:
        super().__init__(cfg, backend)
        self.max_model_len_limit = window_cap(cfg)
