"""Prefill and decode in two processes with KV moved over the 'ucx' connector."""

from __future__ import annotations

import pytest
from kvtransfer_cases import *  # noqa: F403 (the shared tests and fixtures this module runs)


@pytest.fixture(scope="module")
def transport() -> str:
    return "ucx"
