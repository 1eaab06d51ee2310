"""Sampling parameters: vLLM's fields and defaults, validated on construction."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from tandem.engine import envs

_GREEDY_EPS = 1e-5
MAX_STOP_STRING_CHARS = 256
# Bounds that keep every value inside the types it meets downstream: seeds are int64 on
# the wire and in torch generators (sample i of an n > 1 request draws with seed + i), and
# counts and token ids are uint32 on the wire. A value past them would pass here and raise
# later inside an engine step.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
UINT32_MAX = 2**32 - 1
MAX_TOP_K = 2**31 - 1  # past the vocabulary size top_k is off anyway
# Above these the distribution no longer changes in float32 (every logit over a huge
# temperature is 0; a huge penalty pushes every seen token to the bottom), so larger
# values are mistakes, refused rather than carried.
MAX_TEMPERATURE = 100.0
MAX_REPETITION_PENALTY = 100.0


def check_token_ids(token_ids: list[int], vocab_size: int, name: str) -> None:
    """Raise a ValueError naming ``name`` unless every id is a token of a vocabulary of
    ``vocab_size`` (the engine checks, and so does the HTTP layer before any instance)."""
    for token in token_ids:
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab_size:
            raise ValueError(
                f"{name}: {token!r} is not a token id of this model "
                f"(an integer in [0, {vocab_size}))"
            )


class RequestOutputKind(enum.Enum):
    CUMULATIVE = 0  # every output holds everything generated so far
    DELTA = 1  # every output holds only what is new since the last one
    FINAL_ONLY = 2  # one output, when the request finishes


@dataclass
class SamplingParams:
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    # Filled by the engine: the EOS ids that end this request unless ignore_eos.
    all_stop_token_ids: set[int] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self._verify()
        self.all_stop_token_ids = set(self.stop_token_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    def _verify(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"{name} {why}, got {getattr(self, name)!r}")

        for name in ("presence_penalty", "frequency_penalty", "repetition_penalty",
                     "temperature", "top_p", "min_p"):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise bad(name, "must be a number")
            if not math.isfinite(value):
                raise bad(name, "must be a finite number")
        if not isinstance(self.n, int) or self.n < 1:
            raise bad("n", "must be an integer >= 1")
        if self.n > envs.max_n():
            raise bad("n", f"must be at most {envs.max_n()}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise bad(name, "must be in [-2, 2]")
        if not 0.0 < self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise bad("repetition_penalty", f"must be in (0, {MAX_REPETITION_PENALTY:g}]")
        if not 0.0 <= self.temperature <= MAX_TEMPERATURE:
            raise bad("temperature", f"must be in [0, {MAX_TEMPERATURE:g}]")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "must be in (0, 1]")
        if not isinstance(self.top_k, int) or not 0 <= self.top_k <= MAX_TOP_K:
            raise bad("top_k", f"must be -1 or 0 (off) or a positive integer <= {MAX_TOP_K}")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "must be in [0, 1]")
        if self.max_tokens is not None and (
            not isinstance(self.max_tokens, int) or not 1 <= self.max_tokens <= UINT32_MAX
        ):
            raise bad("max_tokens", f"must be an integer in [1, {UINT32_MAX}]")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= UINT32_MAX:
            raise bad("min_tokens", f"must be an integer in [0, {UINT32_MAX}]")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"must be <= max_tokens ({self.max_tokens})")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise bad(name, "must be an integer >= 0")
            if value is not None and value > envs.max_logprobs():
                raise bad(name, f"must be at most {envs.max_logprobs()}")
        if self.seed is not None:
            if isinstance(self.seed, bool) or not isinstance(self.seed, int):
                raise bad("seed", "must be an integer")
            if not INT64_MIN <= self.seed <= INT64_MAX - (self.n - 1):
                # the last sample of an n > 1 request draws with seed + n - 1
                raise bad(
                    "seed", f"must be in [{INT64_MIN}, {INT64_MAX - (self.n - 1)}] for n={self.n}"
                )
        if len(self.stop) > envs.max_stop_strings():
            raise bad("stop", f"may hold at most {envs.max_stop_strings()} strings")
        for s in self.stop:
            if not isinstance(s, str) or not s or len(s) > MAX_STOP_STRING_CHARS:
                raise bad(
                    "stop", f"must hold non-empty strings of <= {MAX_STOP_STRING_CHARS} chars"
                )
        if any(
            isinstance(t, bool) or not isinstance(t, int) or not 0 <= t <= UINT32_MAX
            for t in self.stop_token_ids
        ):
            raise bad("stop_token_ids", "must hold token ids (non-negative integers)")

    def child(self, index: int) -> SamplingParams:
        """Parameters of sample ``index`` of an ``n > 1`` request: n=1, seed shifted."""
        seed = None if self.seed is None else self.seed + index
        values = {k: v for k, v in self.__dict__.items() if k != "all_stop_token_ids"}
        params = SamplingParams(**{**values, "n": 1, "seed": seed})
        params.all_stop_token_ids = set(self.all_stop_token_ids)
        return params
