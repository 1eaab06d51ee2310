"""The scheduler: each step, a token budget handed out as ``{request_id: num_tokens}``.

Running requests first (decode tokens and unfinished prefill chunks), then waiting ones.
Prefill, chunked prefill, prefix-cache hits, recompute after preemption and KV loaded
from another engine are all ``num_computed_tokens`` catching up to ``num_tokens``.
"""

from __future__ import annotations

import time
from collections import deque

from tandem.engine.config import EngineConfig, EngineRuntime
from tandem.engine.kv_cache_manager import KVCacheManager
from tandem.engine.request import Request, RequestStatus
from tandem.engine.scheduler_output import (
    CachedRequestData,
    EngineCoreOutput,
    ModelRunnerOutput,
    NewRequestData,
    SchedulerOutput,
)
from tandem.kvtransfer.base import FinishedTransfers, KVConnectorScheduler


class Scheduler:
    def __init__(
        self,
        config: EngineConfig,
        runtime: EngineRuntime,
        connector: KVConnectorScheduler | None = None,
    ) -> None:
        self.config, self.runtime, self.connector = config, runtime, connector
        self.role = config.scheduler.role
        self.block_size = config.cache.block_size
        self.kv = KVCacheManager(
            runtime.num_kv_blocks, self.block_size, config.cache.enable_prefix_caching
        )
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.waiting_for_remote: dict[str, Request] = {}
        self.leased: dict[str, tuple[Request, float]] = {}  # request id -> (request, deadline)
        self.finished_ids: set[str] = set()  # told to the runner in the next output
        self.num_preemptions = 0

    # -- requests in and out ----------------------------------------------------------------
    def knows(self, request_id: str) -> bool:
        """Whether ``request_id`` is in use here (running, waiting or leased)."""
        return request_id in self.requests or request_id in self.leased

    def add_request(self, request: Request) -> None:
        if self.knows(request.request_id):
            raise ValueError(f"request_id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish_requests(self, request_ids: list[str], status: RequestStatus) -> None:
        """Abort (or stop on a stop string) requests in any state; their blocks go back."""
        for rid in request_ids:
            if rid in self.leased:
                self._drop_lease(rid)
            request = self.requests.get(rid)
            if request is None or request.status.finished:
                continue
            request.status = status
            self._free_request(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def has_work(self) -> bool:
        """Anything to step for: requests, or leases whose confirmation may arrive."""
        return bool(self.requests or self.leased)

    # -- one step -------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.config.scheduler.max_num_batched_tokens
        scheduled: dict[str, int] = {}
        cached: list[CachedRequestData] = []
        self._expire_leases()
        preempted = False
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            new_blocks = self.kv.allocate_slots(request, num_new)
            while new_blocks is None:  # out of blocks: preempt the newest running request
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is request:
                    break
                new_blocks = self.kv.allocate_slots(request, num_new)
            if new_blocks is None:
                break
            scheduled[request.request_id] = num_new
            budget -= num_new
            block_ids = [b.block_id for b in new_blocks]
            cached.append(
                CachedRequestData(request.request_id, block_ids, request.num_computed_tokens)
            )
            index += 1
        new = [] if preempted else self._schedule_waiting(scheduled, budget)
        finished, self.finished_ids = self.finished_ids, set()
        meta = self.connector.build_connector_meta() if self.connector else None
        return SchedulerOutput(new, cached, scheduled, sum(scheduled.values()), finished, meta)

    def _schedule_waiting(self, scheduled: dict[str, int], budget: int) -> list[NewRequestData]:
        new: list[NewRequestData] = []
        skipped: list[Request] = []
        max_seqs = self.config.scheduler.max_num_seqs
        while self.waiting and budget > 0 and len(self.running) < max_seqs:
            request = self.waiting.popleft()
            owner = request.prompt_owner
            if (
                owner is not None
                and not owner.status.finished
                and (owner.num_computed_tokens < owner.num_prompt_tokens)
            ):
                skipped.append(request)  # its sibling is still computing the shared prompt
                continue
            hits, num_hit, holds_blocks = self._computed_prefix(request)
            num_external = 0
            if self.connector is not None:
                num_external = self.connector.get_num_new_matched_tokens(request, num_hit)
            num_new = num_external or min(request.num_tokens - num_hit, budget)
            new_blocks = self.kv.allocate_slots(request, num_new, hits)
            if new_blocks is None:
                self.waiting.appendleft(request)
                break
            if request.num_preemptions == 0 and not holds_blocks:
                request.num_cached_tokens = num_hit
            request.num_computed_tokens = num_hit
            block_ids = self.kv.get_block_ids(request.request_id)
            if num_external:
                self.connector.update_state_after_alloc(request, block_ids, num_external)
                request.status = RequestStatus.WAITING_FOR_REMOTE_KV
                self.waiting_for_remote[request.request_id] = request
                continue
            request.status = RequestStatus.RUNNING
            request.first_scheduled_time = request.first_scheduled_time or time.monotonic()
            self.running.append(request)
            scheduled[request.request_id] = num_new
            budget -= num_new
            params = request.sampling_params
            new.append(
                NewRequestData(
                    request.request_id,
                    list(request.all_token_ids),
                    request.num_prompt_tokens,
                    params,
                    block_ids,
                    num_hit,
                )
            )
        self.waiting.extendleft(reversed(skipped))
        return new

    def _computed_prefix(self, request: Request) -> tuple[list, int, bool]:
        """(blocks to reuse, tokens they cover, whether the request already holds blocks).

        A request whose KV arrived from another engine already holds its blocks; a sibling
        sample (n > 1) reuses its owner's prompt blocks even without prefix caching.
        """
        if request.request_id in self.kv.req_to_blocks:
            return [], request.num_computed_tokens, True
        hits, num_hit = self.kv.get_computed_blocks(request)
        owner = request.prompt_owner
        if owner is not None and not owner.status.finished:
            shared = self.kv.prompt_blocks_to_share(owner, request)
            if len(shared) > len(hits):
                hits, num_hit = shared, len(shared) * self.block_size
        return hits, num_hit, False

    def update_from_output(
        self, scheduler_output: SchedulerOutput, model_output: ModelRunnerOutput
    ) -> list[EngineCoreOutput]:
        outputs = self._fail_requests(model_output.failed)
        for rid, num_tokens in scheduler_output.num_scheduled_tokens.items():
            request = self.requests.get(rid)
            if request is None or request.status is not RequestStatus.RUNNING:
                continue  # finished (aborted, failed) or preempted while the step ran
            request.num_computed_tokens += num_tokens
            self.kv.cache_blocks(request, request.num_computed_tokens)
            token = model_output.sampled_token_ids.get(rid)
            new_tokens = [] if token is None else [token]
            if token is not None:
                request.append_output_token_id(token)
                self._check_stop(request, token)
            prompt_logprobs = model_output.prompt_logprobs.get(rid)
            if not new_tokens and prompt_logprobs is None:
                continue
            logprobs = model_output.logprobs.get(rid)
            out = EngineCoreOutput(
                rid,
                new_tokens,
                None if logprobs is None else [logprobs],
                prompt_logprobs,
                num_cached_tokens=request.num_cached_tokens,
            )
            if request.status.finished:
                out.finish_reason = request.status.finish_reason
                out.stop_reason = request.stop_reason
                out.queue_seconds = request.first_scheduled_time - request.arrival_time
                out.kv_transfer_params = self._free_request(request)
            outputs.append(out)
        if model_output.finished_transfers is not None:
            outputs += self._update_transfers(model_output.finished_transfers)
        return outputs

    # -- helpers --------------------------------------------------------------------------
    def _fail_requests(self, failed: dict[str, str]) -> list[EngineCoreOutput]:
        """Abort the requests the runner could not run, each with its error."""
        outputs = []
        for rid, why in failed.items():
            request = self.requests.get(rid)
            if request is None or request.status.finished:
                continue
            request.status = RequestStatus.FINISHED_ABORTED
            self._free_request(request)
            error = f"request {rid}: {why}"
            outputs.append(EngineCoreOutput(rid, [], finish_reason="abort", error=error))
        return outputs

    def _check_stop(self, request: Request, token: int) -> None:
        """vLLM's order: the length cap first, then EOS and stop tokens past min_tokens."""
        params = request.sampling_params
        if (
            request.num_output_tokens >= request.max_tokens
            or request.num_tokens >= self.runtime.max_model_len
        ):
            request.status = RequestStatus.FINISHED_LENGTH
        elif request.num_output_tokens >= params.min_tokens and (
            (not params.ignore_eos and token in self.runtime.eos_token_ids)
            or token in params.all_stop_token_ids
        ):
            request.status = RequestStatus.FINISHED_STOPPED
            if token in params.all_stop_token_ids:
                request.stop_reason = token
        elif self.role == "prefill":  # a prefill engine stops after the first token
            request.status = RequestStatus.FINISHED_LENGTH

    def _preempt(self, request: Request) -> None:
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.finished_ids.add(request.request_id)  # the runner forgets it until it resumes
        self.waiting.appendleft(request)

    def _free_request(self, request: Request) -> dict | None:
        """Release a finished request; returns kv_transfer_params if its blocks are leased."""
        rid = request.request_id
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.waiting_for_remote.pop(rid, None)
        self.requests.pop(rid, None)
        self.finished_ids.add(rid)
        keep, params = False, None
        if self.connector is not None:
            keep, params = self.connector.request_finished(request, self.kv.get_block_ids(rid))
        if keep:
            self.leased[rid] = (request, time.monotonic() + self.config.transfer.kv_lease_seconds)
        else:
            self.kv.free(request)
        return params

    def _expire_leases(self) -> None:
        now = time.monotonic()
        for rid in [rid for rid, (_, deadline) in self.leased.items() if deadline < now]:
            self._drop_lease(rid)

    def _drop_lease(self, rid: str) -> None:
        """Free a lease nobody took (expired or aborted) and tell the connector to stop
        serving its blocks; a lease the decode side took ends in ``_update_transfers``."""
        self.kv.free(self.leased.pop(rid)[0])
        if self.connector is not None:
            self.connector.lease_released(rid)

    def _update_transfers(self, finished: FinishedTransfers) -> list[EngineCoreOutput]:
        for rid in finished.sending:
            if rid in self.leased:
                self.kv.free(self.leased.pop(rid)[0])
        outputs = []
        for rid in finished.receiving | finished.failed:
            request = self.waiting_for_remote.pop(rid, None)
            if request is None:
                continue
            if rid in finished.failed and self.config.transfer.kv_load_failure_policy == "fail":
                request.status = RequestStatus.FINISHED_ABORTED
                self._free_request(request)
                error = f"request {rid}: loading its KV from the prefill instance failed"
                if finished.errors and rid in finished.errors:
                    error += f": {finished.errors[rid]}"
                outputs.append(EngineCoreOutput(rid, [], finish_reason="abort", error=error))
                continue
            if rid in finished.receiving:
                params = request.kv_transfer_params or {}
                request.num_computed_tokens = int(params.get("num_remote_tokens", 0))
                self.kv.cache_blocks(request, request.num_computed_tokens)
            else:  # recompute: start over from whatever the local prefix cache holds
                self.kv.free(request)
                request.num_computed_tokens = 0
            request.kv_transfer_params = None
            request.status = RequestStatus.WAITING
            self.waiting.appendleft(request)
        return outputs
