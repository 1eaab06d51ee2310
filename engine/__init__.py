"""tandem.engine: the one engine library every Tandem service runs on.

The names below load on first use, so ``import tandem.engine.sampling_params`` (the
router's) does not pull torch and the whole engine in with it.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LLM": "tandem.engine.llm",
    "LLMEngine": "tandem.engine.llm_engine",
    "EngineConfig": "tandem.engine.config",
    "CompletionOutput": "tandem.engine.outputs",
    "Logprob": "tandem.engine.outputs",
    "RequestOutput": "tandem.engine.outputs",
    "RequestOutputKind": "tandem.engine.sampling_params",
    "SamplingParams": "tandem.engine.sampling_params",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tandem.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
