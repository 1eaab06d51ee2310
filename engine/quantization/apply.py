"""Quantizing a loaded model in place: which layers, and what they weigh.

Applied to a built model after its weights load (``ModelRunner._load_model``), not woven
into the model files. Every ``nn.Linear`` of the decoder (``model.model``: q/k/v, o,
gate/up, down, and their GPT-2/OPT counterparts) takes the chosen method. The vocabulary
embedding and the LM head (one table when tied, as in SmolLM2) are quantized too but
always to int8: they hold a fifth of SmolLM2-135M's weights, so leaving them in float
caps the saving (int4 in bfloat16 would reach only 2.4x, short of the 3x goal), while the
head is the layer most sensitive to error (llama.cpp's 4-bit formats keep it wider too).
Norms, biases and position tables stay in float.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from tandem.engine.quantization.base import QuantizationMethod, QuantizedWeight
from tandem.engine.quantization.layers import QuantEmbedding, QuantLinear
from tandem.engine.quantization.rtn import Int8RTN
from torch import nn


class QuantizationSummary(NamedTuple):
    method: str
    group_size: int
    num_linear: int  # decoder linears and the LM head replaced
    num_embedding: int
    bytes_before: int
    bytes_after: int

    @property
    def ratio(self) -> float:
        return self.bytes_before / self.bytes_after


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by ``model``'s parameters and persistent buffers, each storage once
    (a tied table counts once; rotary cos/sin tables, non-persistent, not at all)."""
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        tensors = list(module._parameters.values()) + [
            b for n, b in module._buffers.items() if n not in module._non_persistent_buffers_set
        ]
        for tensor in tensors:
            if tensor is None:
                continue
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def _replace(module: nn.Module, swap: Callable[[nn.Module], nn.Module | None]) -> None:
    """Depth first: put ``swap(child)`` in place of each child it returns a module for."""
    for name, child in list(module.named_children()):
        new = swap(child)
        if new is None:
            _replace(child, swap)
        else:
            setattr(module, name, new)


def quantize_model(model: nn.Module, method: QuantizationMethod) -> QuantizationSummary:
    """Replace ``model``'s linears and vocabulary tables by quantized ones (see module doc).

    ``model`` is a ``CausalLM``: a decoder under ``model.model`` and a ``lm_head``.
    """
    before = weight_bytes(model)
    vocab_method = Int8RTN(method.group_size)
    vocab_size = model.config.vocab_size
    done: dict[int, QuantizedWeight] = {}  # id(float weight) -> its quantized form
    counts = {"linear": 0, "embedding": 0}

    def quantized(weight: torch.Tensor, chosen: QuantizationMethod) -> QuantizedWeight:
        if id(weight) not in done:  # a tied table is quantized once and shared
            done[id(weight)] = chosen.quantize(weight)
        return done[id(weight)]

    def swap(child: nn.Module) -> nn.Module | None:
        if isinstance(child, nn.Embedding) and child.num_embeddings == vocab_size:
            counts["embedding"] += 1
            return QuantEmbedding(quantized(child.weight, vocab_method), child.weight.dtype)
        if isinstance(child, nn.Linear) and method.can_quantize(child.weight):
            counts["linear"] += 1
            return QuantLinear(quantized(child.weight, method), child.bias)
        return None

    _replace(model.model, swap)
    head = getattr(model, "lm_head", None)
    if isinstance(head, nn.Linear):
        model.lm_head = QuantLinear(quantized(head.weight, vocab_method), head.bias)
        counts["linear"] += 1
    done.clear()
    return QuantizationSummary(
        method.name,
        method.group_size,
        counts["linear"],
        counts["embedding"],
        before,
        weight_bytes(model),
    )
