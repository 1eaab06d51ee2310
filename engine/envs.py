"""The one typed registry of environment variables; every name has the TANDEM_ prefix."""

from __future__ import annotations

import os
from pathlib import Path


def _get(name: str, default: str) -> str:
    return os.environ.get(name, default)


def cache_dir() -> Path:
    """TANDEM_CACHE_DIR: where converted models live (default ~/.cache/tandem)."""
    return Path(_get("TANDEM_CACHE_DIR", str(Path.home() / ".cache" / "tandem")))


def max_n() -> int:
    """TANDEM_MAX_N: the largest ``n`` a request may ask for (default 16)."""
    return int(_get("TANDEM_MAX_N", "16"))


def max_logprobs() -> int:
    """TANDEM_MAX_LOGPROBS: the most logprobs a request may ask for (default 20)."""
    return int(_get("TANDEM_MAX_LOGPROBS", "20"))


def max_stop_strings() -> int:
    """TANDEM_MAX_STOP_STRINGS: the most stop strings per request (default 16)."""
    return int(_get("TANDEM_MAX_STOP_STRINGS", "16"))


def cpu_packed_linear() -> bool:
    """TANDEM_CPU_PACKED_LINEAR: run CPU linear layers on oneDNN with packed weights (default 1)."""
    return _get("TANDEM_CPU_PACKED_LINEAR", "1") not in ("0", "false", "no")


def cpu_bf16() -> bool | None:
    """TANDEM_CPU_BF16: whether dtype 'auto' computes in bfloat16 on CPU: 'auto' (default,
    None) where the CPU multiplies bf16 natively (AMX or AVX512-BF16), '1' always, '0' never
    (float32, as on a CPU without native bf16)."""
    setting = _get("TANDEM_CPU_BF16", "auto").lower()
    if setting in ("0", "false", "no"):
        return False
    if setting in ("1", "true", "yes"):
        return True
    return None


def engine_multiprocess() -> bool:
    """TANDEM_ENGINE_MULTIPROCESS: services run the engine core in its own process (default 1);
    0 runs it in a thread of the service (debugging)."""
    return _get("TANDEM_ENGINE_MULTIPROCESS", "1") not in ("0", "false", "no")


def profile_dir() -> str | None:
    """TANDEM_PROFILE: a folder; when set, engines record where their step time goes
    (``engine/profiling.py``) and write torch profiler traces there (default: off)."""
    return _get("TANDEM_PROFILE", "") or None


def cpu_fused_ops() -> bool:
    """TANDEM_CPU_FUSED_OPS: run CPU norms, rotary, SwiGLU and the KV-cache write on fused
    C++ ops (default 1); 0 keeps the torch references."""
    return _get("TANDEM_CPU_FUSED_OPS", "1") not in ("0", "false", "no")


def api_key() -> str | None:
    """TANDEM_API_KEY: the key `tandem serve` asks for unless --api-key is given (default none)."""
    return _get("TANDEM_API_KEY", "") or None
