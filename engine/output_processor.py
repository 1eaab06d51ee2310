"""Turns the scheduler's per-step token news into RequestOutputs: detokenization, stop
strings, logprob text, ``n > 1`` fan-in, and the delta / cumulative / final-only forms."""

from __future__ import annotations

from dataclasses import dataclass, field

from tandem.engine.detokenizer import IncrementalDetokenizer
from tandem.engine.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestOutput
from tandem.engine.sampling_params import RequestOutputKind, SamplingParams
from tandem.engine.scheduler_output import EngineCoreOutput


@dataclass
class SampleState:
    """One sample (one engine request) of a user request."""

    index: int
    detokenizer: IncrementalDetokenizer | None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[PositionLogprobs] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_sent_tokens: int = 0  # for delta outputs


@dataclass
class UserRequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    samples: dict[str, SampleState]  # engine request id -> sample
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    num_cached_tokens: int = 0
    kv_transfer_params: dict | None = None
    error: str | None = None
    queue_seconds: float | None = None  # the first-scheduled sample's

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.samples.values())


class OutputProcessor:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.requests: dict[str, UserRequestState] = {}
        self.parent_of: dict[str, str] = {}  # engine request id -> user request id

    def add_request(self, state: UserRequestState) -> None:
        self.requests[state.request_id] = state
        for engine_id in state.samples:
            self.parent_of[engine_id] = state.request_id

    def engine_ids(self, request_id: str) -> list[str]:
        state = self.requests.get(request_id)
        return list(state.samples) if state else []

    def process(
        self, core_outputs: list[EngineCoreOutput]
    ) -> tuple[list[RequestOutput], list[str]]:
        """(outputs to hand out, engine request ids a stop string finished)."""
        stopped: list[str] = []
        touched: dict[str, UserRequestState] = {}
        for out in core_outputs:
            user_id = self.parent_of.get(out.request_id)
            if user_id is None:
                continue
            user = self.requests[user_id]
            sample = user.samples[out.request_id]
            if sample.finish_reason is not None:
                # A stop string finished it here; the core had run on before it heard.
                continue
            user.num_cached_tokens = max(user.num_cached_tokens, out.num_cached_tokens)
            user.kv_transfer_params = out.kv_transfer_params or user.kv_transfer_params
            user.error = out.error or user.error
            if out.queue_seconds is not None and (
                user.queue_seconds is None or out.queue_seconds < user.queue_seconds
            ):
                user.queue_seconds = out.queue_seconds
            if out.new_prompt_logprobs is not None and sample.index == 0:
                user.prompt_logprobs = (user.prompt_logprobs or []) + self._decoded(
                    out.new_prompt_logprobs
                )
            if self._update_sample(user, sample, out):
                stopped.append(out.request_id)
            touched[user_id] = user
        results = []
        for user_id, user in touched.items():
            output = self._make_output(user)
            if output is not None:
                results.append(output)
            if user.finished:
                self._forget(user_id)
        return results, stopped

    def abort(self, request_id: str) -> RequestOutput | None:
        user = self.requests.get(request_id)
        if user is None:
            return None
        for sample in user.samples.values():
            sample.finish_reason = sample.finish_reason or "abort"
        output = self._make_output(user)
        self._forget(request_id)
        return output

    def _update_sample(
        self, user: UserRequestState, sample: SampleState, out: EngineCoreOutput
    ) -> bool:
        """Apply one step's news to a sample; True when a stop string finished it."""
        sample.token_ids += out.new_token_ids
        if out.new_logprobs is not None:
            sample.logprobs = (sample.logprobs or []) + self._decoded(out.new_logprobs)
            for token, position in zip(out.new_token_ids, out.new_logprobs):
                sample.cumulative_logprob = (sample.cumulative_logprob or 0.0) + position[
                    token
                ].logprob
        stop_string = None
        if sample.detokenizer is not None and out.new_token_ids:
            stop_string = sample.detokenizer.update(out.new_token_ids)
        if stop_string is not None and sample.finish_reason is None:
            sample.finish_reason, sample.stop_reason = "stop", stop_string
            return out.finish_reason is None  # the engine still runs it: stop it there
        if out.finish_reason is not None and sample.finish_reason is None:
            sample.finish_reason, sample.stop_reason = out.finish_reason, out.stop_reason
        return False

    def _decoded(self, positions: list[PositionLogprobs | None]) -> list:
        if self.tokenizer is None:
            return positions
        return [
            None
            if p is None
            else {
                tid: Logprob(lp.logprob, lp.rank, self.tokenizer.decode([tid]))
                for tid, lp in p.items()
            }
            for p in positions
        ]

    def _make_output(self, user: UserRequestState) -> RequestOutput | None:
        kind = user.params.output_kind
        finished = user.finished
        if kind is RequestOutputKind.FINAL_ONLY and not finished:
            return None
        delta = kind is RequestOutputKind.DELTA
        completions = []
        for sample in sorted(user.samples.values(), key=lambda s: s.index):
            done = sample.finish_reason is not None
            text = (
                sample.detokenizer.get_next_output_text(done, delta) if sample.detokenizer else ""
            )
            start = sample.num_sent_tokens if delta else 0
            logprobs = sample.logprobs[start:] if sample.logprobs is not None else None
            completions.append(
                CompletionOutput(
                    sample.index,
                    text,
                    sample.token_ids[start:],
                    sample.cumulative_logprob,
                    logprobs,
                    sample.finish_reason,
                    sample.stop_reason,
                )
            )
            sample.num_sent_tokens = len(sample.token_ids)
        prompt_logprobs = user.prompt_logprobs
        if delta:
            user.prompt_logprobs = None  # sent once
        return RequestOutput(
            user.request_id,
            user.prompt,
            user.prompt_token_ids,
            prompt_logprobs,
            completions,
            finished,
            user.num_cached_tokens,
            user.kv_transfer_params,
            _metrics(user),
        )

    def _forget(self, request_id: str) -> None:
        user = self.requests.pop(request_id, None)
        for engine_id in user.samples if user else ():
            self.parent_of.pop(engine_id, None)


def _metrics(user: UserRequestState) -> dict:
    """RequestOutput.metrics: 'error' when the engine failed it, 'queue_time' once known."""
    metrics: dict = {}
    if user.error:
        metrics["error"] = user.error
    if user.queue_seconds is not None:
        metrics["queue_time"] = user.queue_seconds
    return metrics
