"""Workloads for ``tandem bench serve``: the prompts and the output lengths to ask for.

First stage of the benchmark: the dataset named by ``--dataset-name`` becomes a list of
``SampleRequest``, which the runner sends and the metrics compare against. Synthetic
prompts are random token ids decoded to text (the server tokenizes text again, so each
prompt is re-encoded and trimmed or topped up until its length is the one asked for).
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Re-encoding rounds before a prompt keeps whatever length it has; a handful suffices
# in practice, the cap only bounds pathological tokenizers.
_MAX_FIT_ROUNDS = 10

# ShareGPT pruning bounds, the ones vLLM applies, so both tools draw the same conversations.
_SHAREGPT_MIN_LEN = 4
_SHAREGPT_MAX_PROMPT_LEN = 1024
_SHAREGPT_MAX_TOTAL_LEN = 2048


class SampleRequest(NamedTuple):
    prompt: str
    # Tokens in the prompt by the client's tokenizer; the server's own count (from the
    # streamed usage) replaces it in the results when the server reports one.
    prompt_len: int
    expected_output_len: int


def allowed_token_ids(tokenizer: PreTrainedTokenizerBase) -> np.ndarray:
    """Ids a random prompt may hold: the vocabulary less special tokens (BOS, EOS ...),
    which would end or restart a sequence mid-prompt."""
    special = set(tokenizer.all_special_ids)
    return np.array([i for i in range(tokenizer.vocab_size) if i not in special])


def fit_text(
    tokenizer: PreTrainedTokenizerBase,
    token_ids: list[int],
    target_len: int,
    allowed: np.ndarray,
    rng: np.random.Generator,
) -> tuple[str, int]:
    """Text that encodes to ``target_len`` tokens, built from ``token_ids``.

    Decoding N ids and encoding the text need not give N ids back (merges across the
    joins), so the ids are re-encoded, cut or topped up with random ids, and tried
    again. Returns the text and its final token count (which can miss the target by a
    token or two for tokenizers that never settle).
    """
    ids = list(token_ids)
    for _ in range(_MAX_FIT_ROUNDS):
        text = tokenizer.decode(ids)
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) == target_len:
            return text, target_len
        if len(ids) > target_len:
            ids = ids[:target_len]
        else:
            ids += rng.choice(allowed, size=target_len - len(ids)).tolist()
    text = tokenizer.decode(ids)
    return text, len(tokenizer.encode(text, add_special_tokens=False))


def length_bounds(length: int, range_ratio: float) -> tuple[int, int]:
    """The inclusive integer range ``[floor(L*(1-r)), ceil(L*(1+r))]`` lengths are drawn from."""
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {range_ratio}")
    return math.floor(length * (1 - range_ratio)), math.ceil(length * (1 + range_ratio))


def random_requests(
    tokenizer: PreTrainedTokenizerBase,
    num_requests: int,
    input_len: int,
    output_len: int,
    range_ratio: float,
    prefix_len: int,
    rng: np.random.Generator,
) -> list[SampleRequest]:
    """Random prompts: one shared prefix of ``prefix_len`` tokens, then a random part
    whose length is drawn around ``input_len``; output lengths drawn around ``output_len``."""
    # The server adds the tokenizer's special tokens (a BOS, say) to every prompt; they
    # count towards the input length the user asked for.
    real_input_len = max(0, input_len - tokenizer.num_special_tokens_to_add())
    input_low, input_high = length_bounds(real_input_len, range_ratio)
    output_low, output_high = length_bounds(output_len, range_ratio)
    output_low, output_high = max(output_low, 1), max(output_high, 1)
    if prefix_len + input_low < 1:
        raise ValueError(
            f"--random-input-len {input_len} with --random-range-ratio {range_ratio} and "
            f"--random-prefix-len {prefix_len} allows empty prompts; raise the input length"
        )
    input_lens = rng.integers(input_low, input_high + 1, size=num_requests)
    output_lens = rng.integers(output_low, output_high + 1, size=num_requests)
    allowed = allowed_token_ids(tokenizer)
    prefix = rng.choice(allowed, size=prefix_len).tolist()
    requests = []
    for num_inner, num_out in zip(input_lens, output_lens):
        ids = prefix + rng.choice(allowed, size=int(num_inner)).tolist()
        text, num_tokens = fit_text(tokenizer, ids, len(ids), allowed, rng)
        requests.append(SampleRequest(text, num_tokens, int(num_out)))
    return requests


def prefix_repetition_requests(
    tokenizer: PreTrainedTokenizerBase,
    num_requests: int,
    prefix_len: int,
    suffix_len: int,
    num_prefixes: int,
    output_len: int,
    rng: np.random.Generator,
) -> list[SampleRequest]:
    """``num_prefixes`` random prefixes, each followed by ``num_requests // num_prefixes``
    fresh random suffixes, shuffled: the workload prefix caching is measured on."""
    per_prefix = num_requests // num_prefixes if num_prefixes > 0 else 0
    if per_prefix == 0:
        raise ValueError(
            f"--num-prompts ({num_requests}) must be at least "
            f"--prefix-repetition-num-prefixes ({num_prefixes}), which must be positive"
        )
    allowed = allowed_token_ids(tokenizer)
    requests = []
    for _ in range(num_prefixes):
        prefix_ids = rng.choice(allowed, size=prefix_len).tolist()
        # Fitted once on its own, so every prompt of the group starts with the same text.
        prefix_text, _ = fit_text(tokenizer, prefix_ids, prefix_len, allowed, rng)
        prefix_ids = tokenizer.encode(prefix_text, add_special_tokens=False)
        for _ in range(per_prefix):
            suffix_ids = rng.choice(allowed, size=suffix_len).tolist()
            suffix_text, _ = fit_text(tokenizer, suffix_ids, suffix_len, allowed, rng)
            suffix_ids = tokenizer.encode(suffix_text, add_special_tokens=False)
            ids = prefix_ids + suffix_ids
            requests.append(SampleRequest(tokenizer.decode(ids), len(ids), output_len))
    order = rng.permutation(len(requests))
    return [requests[i] for i in order]


def _first_exchange(entry: dict) -> tuple[str, str] | None:
    """The first human turn and the reply after it, or None when the entry has neither."""
    turns = entry.get("conversations") or []
    for i, turn in enumerate(turns[:-1]):
        if turn.get("from") in ("human", "user"):
            return turn.get("value", ""), turns[i + 1].get("value", "")
    return None


def sharegpt_requests(
    path: str | pathlib.Path,
    tokenizer: PreTrainedTokenizerBase,
    num_requests: int,
    output_len: int | None,
    rng: np.random.Generator,
) -> list[SampleRequest]:
    """Conversations from a local ShareGPT JSON file (a list of ``{"conversations":
    [{"from", "value"}, ...]}``): the first human turn is the prompt; the reply's token
    count is the output length unless ``output_len`` overrides it."""
    with open(path, encoding="utf-8") as f:
        entries = json.load(f)
    if not isinstance(entries, list):
        raise ValueError(f"{path}: a ShareGPT file holds a JSON list of conversations")
    order = rng.permutation(len(entries))
    requests: list[SampleRequest] = []
    for index in order:
        if len(requests) >= num_requests:
            break
        exchange = _first_exchange(entries[index])
        if exchange is None:
            continue
        prompt, reply = exchange
        prompt_len = len(tokenizer(prompt).input_ids)
        reply_len = len(tokenizer(reply).input_ids) if output_len is None else output_len
        too_short = prompt_len < _SHAREGPT_MIN_LEN or (
            output_len is None and reply_len < _SHAREGPT_MIN_LEN
        )
        too_long = (
            prompt_len > _SHAREGPT_MAX_PROMPT_LEN
            or prompt_len + reply_len > _SHAREGPT_MAX_TOTAL_LEN
        )
        if not (too_short or too_long):
            requests.append(SampleRequest(prompt, prompt_len, reply_len))
    if not requests:
        raise ValueError(f"{path}: no conversation fits the length limits")
    # Fewer usable conversations than prompts asked for: repeat random ones, as vLLM does.
    num_usable = len(requests)
    while len(requests) < num_requests:
        requests.append(requests[int(rng.integers(num_usable))])
    return requests
