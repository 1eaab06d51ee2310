"""Drop-in replacements for ``nn.Linear`` (and ``MergedLinear``) and ``nn.Embedding``
whose weight is a ``QuantizedWeight``.

A tied vocabulary embedding and LM head share one ``QuantizedWeight`` module, so the
table is stored once, as before quantization.
"""

from __future__ import annotations

import torch
from tandem.engine.quantization.base import QuantizedWeight
from torch import nn


class QuantLinear(nn.Module):
    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.in_features, weight.out_features
        self.weight_q = weight
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in_features] -> [..., out_features]
        flat = x.reshape(-1, self.in_features)
        if flat.stride(-1) != 1:
            flat = flat.contiguous()
        out = self.weight_q.matmul(flat)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)


class QuantEmbedding(nn.Module):
    def __init__(self, weight: QuantizedWeight, dtype: torch.dtype) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.out_features, weight.in_features
        self.weight_q = weight
        self.dtype = dtype  # the model's dtype, which the rows come out in

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # input_ids: [num_tokens] -> [num_tokens, embedding_dim]; only these rows dequantize
        flat = input_ids.reshape(-1)
        rows = self.weight_q.dequantize(self.dtype, rows=flat)
        return rows.view(*input_ids.shape, self.embedding_dim)
