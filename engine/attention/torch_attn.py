"""The plain-torch attention backend (CPU, and the reference for the Triton one).

Decode rows are handled in one batched SDPA call over their gathered blocks; each prefill
span gets its own call (few per step under the token budget).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tandem.engine.attention.base import AttentionBackend, AttentionMetadata


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def forward(self, layer_idx, q, k, v, kv_cache, meta: AttentionMetadata, scale):
        num_blocks, num_layers, _, block_size, num_kv_heads, head_dim = kv_cache.shape
        # rows: [num_blocks * num_layers * 2, block_size, num_kv_heads, head_dim]
        rows = kv_cache.view(num_blocks * num_layers * 2, block_size, num_kv_heads, head_dim)
        self._write_cache(layer_idx, k, v, kv_cache, meta)

        num_heads = q.shape[1]
        group = num_heads // num_kv_heads
        out = torch.empty_like(q)
        if meta.num_decodes:
            self._decode(layer_idx, q, kv_cache, meta, scale, out)
        for span in meta.prefills:
            sl = slice(span.query_start, span.query_start + span.query_len)
            qs = q[sl].transpose(0, 1)[None]  # [1, num_heads, query_len, head_dim]
            if span.mask is None:  # the whole context is this chunk: no gather needed
                ks, vs = k[sl].transpose(0, 1)[None], v[sl].transpose(0, 1)[None]
            else:
                block_rows = (span.block_ids[None] * num_layers + layer_idx) * 2
                ks = _gather(rows, block_rows, 1)[:, :, : span.context_len]
                vs = _gather(rows, block_rows + 1, 1)[:, :, : span.context_len]
            # 4-D inputs with enable_gqa reach the CPU flash kernel (3-D ones fall back to
            # the math path, ~1.6x slower here) and need no repeat of the kv heads.
            o = F.scaled_dot_product_attention(
                qs, ks, vs, attn_mask=span.mask, is_causal=span.mask is None, scale=scale,
                enable_gqa=group > 1,
            )  # fmt: skip
            out[sl] = o[0].transpose(0, 1)
        return out

    def _write_cache(self, layer_idx, k, v, kv_cache, meta: AttentionMetadata) -> None:
        """Put the new tokens' K and V rows into their slots of layer ``layer_idx``."""
        num_blocks, num_layers, _, block_size, num_kv_heads, head_dim = kv_cache.shape
        rows = kv_cache.view(num_blocks * num_layers * 2, block_size, num_kv_heads, head_dim)
        k_row = (meta.slot_block * num_layers + layer_idx) * 2
        rows[k_row, meta.slot_offset] = k
        rows[k_row + 1, meta.slot_offset] = v

    def _decode(self, layer_idx, q, kv_cache, meta: AttentionMetadata, scale, out) -> None:
        """Attend the decode rows ``[0, num_decodes)`` of q and write them into ``out``."""
        num_blocks, num_layers, _, block_size, num_kv_heads, head_dim = kv_cache.shape
        rows = kv_cache.view(num_blocks * num_layers * 2, block_size, num_kv_heads, head_dim)
        nd, num_heads = meta.num_decodes, q.shape[1]
        block_rows = (meta.decode_block_tables * num_layers + layer_idx) * 2
        # keys/values: [num_decodes, num_kv_heads, max_blocks * block_size, head_dim]
        keys = _gather(rows, block_rows, nd)
        values = _gather(rows, block_rows + 1, nd)
        # The group's query heads share one kv head: fold them into the query axis.
        qd = q[:nd].view(nd, num_kv_heads, num_heads // num_kv_heads, head_dim)
        o = F.scaled_dot_product_attention(
            qd, keys, values, attn_mask=meta.decode_mask, scale=scale
        )
        out[:nd] = o.reshape(nd, num_heads, head_dim)


def _gather(rows: torch.Tensor, block_rows: torch.Tensor, batch: int) -> torch.Tensor:
    """Blocks ``block_rows`` [batch, n] -> [batch, num_kv_heads, n * block_size, head_dim]."""
    _, block_size, num_kv_heads, head_dim = rows.shape
    picked = rows.index_select(0, block_rows.reshape(-1))
    return picked.view(batch, -1, num_kv_heads, head_dim).transpose(1, 2)
