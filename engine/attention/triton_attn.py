"""The Triton attention backend: the GPU path (on the CPU only under TRITON_INTERPRET=1).

Per layer, three launches: ``reshape_and_cache`` writes the step's new K/V into the cache,
``paged_decode_attention`` runs the decode rows ``[0, num_decodes)`` against their pages,
``paged_prefill_attention`` runs every prefill span (its cached prefix from the pages, its
chunk causally). The launch arguments derived from the step's metadata are built once per
step, on the cache's device, and reused by every layer.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from tandem.engine.attention.base import AttentionBackend, AttentionMetadata


class StepArgs(NamedTuple):
    """One step's kernel arguments, on the cache's device."""

    slot_mapping: torch.Tensor  # [num_tokens] int64: block_id * block_size + offset
    decode_block_tables: torch.Tensor  # [num_decodes, max_blocks] int64
    decode_seq_lens: torch.Tensor  # [num_decodes] int64
    prefill_block_tables: torch.Tensor  # [num_prefills, max_prefix_blocks] int64
    query_start_loc: torch.Tensor  # [num_prefills + 1] int64, rows counted from num_decodes
    prefix_lens: torch.Tensor  # [num_prefills] int64: tokens already cached before the chunk
    max_query_len: int


def build_step_args(meta: AttentionMetadata, block_size: int, device) -> StepArgs:
    """The metadata in the kernels' terms. Prefill spans must follow the decode rows back
    to back, as ``input_builder`` lays them out."""
    starts, prefix_lens, tables = [0], [], []
    for span in meta.prefills:
        if span.query_start != meta.num_decodes + starts[-1]:
            raise ValueError(
                f"meta.prefills: span at row {span.query_start} does not follow the previous "
                f"rows (expected {meta.num_decodes + starts[-1]})"
            )
        starts.append(starts[-1] + span.query_len)
        prefix = span.context_len - span.query_len
        prefix_lens.append(prefix)
        # the span's blocks cover its whole context when it has a prefix; only the
        # prefix's are read (the chunk's K/V come straight from k and v)
        tables.append(span.block_ids[: -(-prefix // block_size)])
    width = max((len(t) for t in tables), default=0) or 1
    # Built on the cache's device from slices of the spans' ids (already there when the
    # runner moved the step's metadata): tensor copies, no host round trip per span.
    prefill_tables = torch.zeros(len(tables), width, dtype=torch.int64, device=device)
    for i, t in enumerate(tables):
        prefill_tables[i, : len(t)] = t

    def to_dev(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=torch.int64, non_blocking=True).contiguous()

    return StepArgs(
        slot_mapping=to_dev(meta.slot_block * block_size + meta.slot_offset),
        decode_block_tables=to_dev(meta.decode_block_tables),
        decode_seq_lens=to_dev(meta.decode_seq_lens),
        prefill_block_tables=to_dev(prefill_tables),
        query_start_loc=to_dev(torch.tensor(starts, dtype=torch.int64)),
        prefix_lens=to_dev(torch.tensor(prefix_lens, dtype=torch.int64)),
        max_query_len=max((s.query_len for s in meta.prefills), default=0),
    )


class TritonAttentionBackend(AttentionBackend):
    """Paged attention in Triton kernels that read K/V where they lie in the cache."""

    name = "triton"

    def __init__(self, device: str | torch.device = "cuda") -> None:
        from tandem.kernels.checks import kernels_interpreted

        if torch.device(device).type == "cpu" and not kernels_interpreted():
            raise ValueError(
                "attention_backend 'triton' on the CPU runs only in Triton's interpreter: "
                "set TRITON_INTERPRET=1 in the environment before starting"
            )
        self._meta: AttentionMetadata | None = None  # the step the cached args belong to
        self._args: StepArgs | None = None

    def step_args(self, meta: AttentionMetadata, kv_cache: torch.Tensor) -> StepArgs:
        if meta is not self._meta:
            self._args = build_step_args(meta, kv_cache.shape[3], kv_cache.device)
            self._meta = meta
        return self._args

    def forward(self, layer_idx, q, k, v, kv_cache, meta: AttentionMetadata, scale):
        from tandem import kernels

        args = self.step_args(meta, kv_cache)
        kernels.reshape_and_cache(k, v, kv_cache, args.slot_mapping, layer_idx)
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        nd = meta.num_decodes
        if nd:
            kernels.paged_decode_attention(
                q[:nd], kv_cache, args.decode_block_tables, args.decode_seq_lens,
                layer_idx, scale, out=out[:nd],
            )  # fmt: skip
        if meta.prefills:
            kernels.paged_prefill_attention(
                q[nd:], k[nd:], v[nd:], kv_cache, args.prefill_block_tables,
                args.query_start_loc, args.prefix_lens, layer_idx, scale, out=out[nd:],
                max_query_len=args.max_query_len,
            )  # fmt: skip
        return out
