"""What an engine reports about itself: its gauges and counters (``EngineStats``).

Plain data with no engine imports, so the router and the metrics read it without torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineStats:
    num_requests_running: int = 0
    num_requests_waiting: int = 0
    kv_cache_usage_perc: float = 0.0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    num_free_kv_blocks: int = 0  # cached-but-unused blocks count as free
    num_leased_requests: int = 0  # prefill: finished requests whose blocks await a decode side
