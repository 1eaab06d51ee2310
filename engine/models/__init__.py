"""Model registry: Hugging Face architecture name -> model class.

Adding an architecture is a new file in this folder plus one line here.
"""

from __future__ import annotations

import importlib

_REGISTRY: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("mistral", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("qwen3", "Qwen3ForCausalLM"),
    "GPT2LMHeadModel": ("gpt2", "GPT2LMHeadModel"),
    "OPTForCausalLM": ("opt", "OPTForCausalLM"),
}


def get_model_class(architectures: list[str] | None) -> type:
    for arch in architectures or []:
        if arch in _REGISTRY:
            module, name = _REGISTRY[arch]
            return getattr(importlib.import_module(f"tandem.engine.models.{module}"), name)
    raise ValueError(f"architectures {architectures} not supported; supported: {sorted(_REGISTRY)}")


def supported_architectures() -> list[str]:
    return sorted(_REGISTRY)
