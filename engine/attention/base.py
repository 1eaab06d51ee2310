"""Attention backends: what a model's attention layer calls, and the per-step metadata.

The KV cache is one tensor ``[num_blocks, num_layers, 2, block_size, num_kv_heads,
head_dim]``: one block of one request is one contiguous region across all layers, so a
KV transfer moves whole blocks. The model runner builds ``AttentionMetadata`` once per
step; every layer reuses it.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


def _fields_to(obj, device: torch.device | str):
    """A copy of dataclass ``obj`` with every tensor field on ``device``; fields added
    later move too, so a new tensor cannot be left behind on the host by accident."""
    moved = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, torch.Tensor):
            moved[f.name] = value.to(device, non_blocking=True)
    return dataclasses.replace(obj, **moved)


@dataclass
class PrefillSpan:
    """One request with more than one query token this step."""

    query_start: int  # first row of its tokens in the flat batch
    query_len: int
    context_len: int  # tokens of KV after this step (cached prefix + this chunk)
    block_ids: torch.Tensor  # [num_blocks_needed] int64
    mask: torch.Tensor | None  # [query_len, context_len] bool; None: plain causal, no prefix

    def to(self, device: torch.device | str) -> PrefillSpan:
        return _fields_to(self, device)


@dataclass
class AttentionMetadata:
    num_tokens: int
    slot_block: torch.Tensor  # [num_tokens] int64: block id of each new token's slot
    slot_offset: torch.Tensor  # [num_tokens] int64: offset inside that block
    # Requests with one query token come first in the batch, as rows [0, num_decodes).
    num_decodes: int
    decode_block_tables: torch.Tensor  # [num_decodes, max_blocks] int64 (padded with 0)
    decode_seq_lens: torch.Tensor  # [num_decodes] int64: context length after this step
    decode_mask: torch.Tensor  # [num_decodes, 1, 1, max_blocks * block_size] bool
    prefills: list[PrefillSpan]

    def to(self, device: torch.device | str) -> AttentionMetadata:
        """This step's metadata on ``device`` (the runner calls it once per step off the
        CPU; every layer then reads the moved copy)."""
        moved = _fields_to(self, device)
        moved.prefills = [span.to(device) for span in self.prefills]
        return moved


class AttentionBackend(ABC):
    name: str

    @abstractmethod
    def forward(
        self,
        layer_idx: int,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,  # [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        """Write k and v into the cache at the new tokens' slots, then attend."""
