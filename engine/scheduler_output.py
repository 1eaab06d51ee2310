"""What the scheduler hands the model runner each step, and what comes back.

The output is a diff: a request's full data travels once (``new_requests``, also after a
preemption); afterwards only its new block ids (``cached_requests``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tandem.engine.outputs import PositionLogprobs
from tandem.engine.sampling_params import SamplingParams
from tandem.kvtransfer.base import FinishedTransfers, KVConnectorMetadata


@dataclass
class NewRequestData:
    request_id: str
    token_ids: list[int]  # every token known now: prompt, then outputs
    num_prompt_tokens: int
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int


@dataclass
class CachedRequestData:
    request_id: str
    new_block_ids: list[int]
    num_computed_tokens: int


@dataclass
class SchedulerOutput:
    new_requests: list[NewRequestData]
    cached_requests: list[CachedRequestData]
    num_scheduled_tokens: dict[str, int]  # request id -> tokens to compute this step
    total_num_scheduled_tokens: int
    finished_request_ids: set[str]  # the runner drops their state
    connector_meta: KVConnectorMetadata | None = None


@dataclass
class ModelRunnerOutput:
    sampled_token_ids: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, PositionLogprobs] = field(default_factory=dict)
    prompt_logprobs: dict[str, list[PositionLogprobs | None]] = field(default_factory=dict)
    finished_transfers: FinishedTransfers | None = None
    # Requests whose own inputs or sampling failed this step (the rest of the batch ran):
    # request id -> why. The scheduler aborts them with that error.
    failed: dict[str, str] = field(default_factory=dict)


@dataclass
class EngineCoreOutput:
    """One request's news from one step, before detokenization."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[PositionLogprobs] | None = None
    new_prompt_logprobs: list[PositionLogprobs | None] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    kv_transfer_params: dict[str, Any] | None = None
    error: str | None = None
    # Set on a request's last output: seconds from arrival to first being scheduled.
    queue_seconds: float | None = None
