"""Session-wide fixtures shared by test modules."""

from __future__ import annotations

import pathlib

import pytest


@pytest.fixture(scope="session")
def default_model_dir() -> pathlib.Path:
    """The default model's converted Hugging Face folder (SmolLM2-135M-Instruct, float32)."""
    from tandem.engine.model_loader import default_model_path

    return default_model_path()
