"""What every model file shares: a decoder (``self.model``) under a vocabulary head."""

from __future__ import annotations

import torch
from torch import nn


class CausalLM(nn.Module):
    """Subclasses build ``self.model`` then call ``attach_head``.

    The runner calls ``forward`` on the flat batch and ``compute_logits`` on the rows it
    samples from; ``load_weights`` (per architecture) fills the parameters.
    """

    tie_default = False  # whether embeddings are tied when the config does not say

    def __init__(self, cfg) -> None:
        super().__init__()
        self.config = cfg

    @property
    def tied(self) -> bool:
        return getattr(self.config, "tie_word_embeddings", self.tie_default)

    def attach_head(self, hidden_size: int, embedding: nn.Embedding) -> None:
        self.lm_head = nn.Linear(hidden_size, self.config.vocab_size, bias=False)
        if self.tied:
            self.lm_head.weight = embedding.weight

    def tied_skip(self) -> tuple[str, ...]:
        """Checkpoint names to ignore: a tied head's copy of the embedding."""
        return ("lm_head.weight",) if self.tied else ()

    def forward(self, input_ids, positions, kv_cache, meta) -> torch.Tensor:
        return self.model(input_ids, positions, kv_cache, meta)  # [num_tokens, hidden]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()  # [num_rows, vocab_size]
