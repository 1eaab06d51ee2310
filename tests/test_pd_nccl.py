"""The cases of test_pd_transports.py with KV moved by torch.distributed point-to-point
(the ``gloo`` backend on CPU: the NCCL connector's code path) instead of UCX."""

from __future__ import annotations

from test_pd_transports import *  # noqa: F403 (the cases and the fixtures they take)
from test_pd_transports import deployment_for

deployment = deployment_for("nccl")
