"""Session-wide fixtures shared by test modules."""

from __future__ import annotations

import os
import pathlib
import sys

import pytest

# `python -m pytest` puts the working directory (the checkout) first on sys.path, where
# the repository's `kernels/` would shadow Hugging Face's `kernels` package that
# transformers imports; Tandem's folders are importable as `tandem.*` without it.
_ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if p not in ("", ".") and pathlib.Path(p).resolve() != _ROOT]

import torch  # noqa: E402

# Triton picks interpreter or compiler when a kernel is defined, from TRITON_INTERPRET: set
# it before any test module imports tandem.kernels, so that on a machine without CUDA the
# kernels run in the interpreter whichever test file loads them first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Parity tests compare with Hugging Face in float32, and dtype 'auto' would pick bfloat16 on a
# CPU with AMX or AVX512-BF16: pin it to float32 here (and in every server a test starts), so
# that the suite checks the same thing on every machine. Tests of bfloat16 ask for it by name.
os.environ["TANDEM_CPU_BF16"] = "0"


@pytest.fixture(scope="session")
def default_model_dir() -> pathlib.Path:
    """The default model's converted Hugging Face folder (SmolLM2-135M-Instruct, bf16)."""
    from tandem.engine.model_loader import default_model_path

    return default_model_path()
