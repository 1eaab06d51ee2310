"""A request inside the engine: its tokens, how many have KV computed, and its state."""

from __future__ import annotations

import enum
import time
from typing import Any

from tandem.engine.block_hash import BlockHash, hash_block_tokens
from tandem.engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = enum.auto()
    WAITING_FOR_REMOTE_KV = enum.auto()  # decode role: blocks allocated, KV in flight
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_ABORTED = enum.auto()

    @property
    def finished(self) -> bool:
        return self in _FINISH_REASONS

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


class Request:
    """``num_computed_tokens`` catches up to ``num_tokens``; that is all scheduling is."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        *,
        max_model_len: int,
        block_size: int,
        cache_salt: str | None = None,
        output_token_ids: list[int] | None = None,
        kv_transfer_params: dict[str, Any] | None = None,
        prompt_owner: Request | None = None,
        arrival_time: float | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.sampling_params = sampling_params
        self.cache_salt = cache_salt
        self.block_size = block_size
        self.all_token_ids = self.prompt_token_ids + list(output_token_ids or [])
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens whose KV came from the prefix cache
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.kv_transfer_params = kv_transfer_params
        # n > 1: the sibling whose prompt blocks this request shares instead of computing.
        self.prompt_owner = prompt_owner
        self.arrival_time = arrival_time if arrival_time is not None else time.monotonic()
        self.first_scheduled_time: float | None = None
        self.num_preemptions = 0
        limit = max_model_len - self.num_prompt_tokens
        wanted = sampling_params.max_tokens
        self.max_tokens = limit if wanted is None else min(wanted, limit)
        self.block_hashes: list[BlockHash] = []
        self.update_block_hashes()

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - self.num_prompt_tokens

    def append_output_token_id(self, token_id: int) -> None:
        self.all_token_ids.append(token_id)
        if len(self.all_token_ids) % self.block_size == 0:
            self.update_block_hashes()

    def update_block_hashes(self) -> None:
        self.block_hashes += hash_block_tokens(
            self.all_token_ids, self.block_size, self.cache_salt, self.block_hashes
        )
