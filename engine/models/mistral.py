"""Mistral: Llama blocks; a sliding window, when the config has one, caps the length.

The attention backends have no sliding window yet, so the model reports the window as
``max_model_len_limit`` and the engine never lets a sequence grow past it (up to the
window, full attention is exactly what the window computes).
"""

from __future__ import annotations

import logging

from tandem.engine.attention import AttentionBackend
from tandem.engine.models.layers import sliding_window_limit
from tandem.engine.models.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)


def window_cap(cfg) -> int | None:
    """``sliding_window_limit`` of the config, saying so in the log when there is one."""
    limit = sliding_window_limit(cfg)
    if limit is not None:
        logger.warning(
            "%s: sliding_window=%d and no sliding-window attention yet: "
            "max_model_len is capped at %d", cfg.model_type, limit, limit,
        )  # fmt: skip
    return limit


class MistralForCausalLM(LlamaForCausalLM):
    def __init__(self, cfg, backend: AttentionBackend) -> None:
        super().__init__(cfg, backend)
        self.max_model_len_limit = window_cap(cfg)
