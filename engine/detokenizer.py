"""Incremental detokenization and stop strings for one output sequence.

Sits between the sampler and what a request returns: the output processor calls
``update`` with each step's new token ids, learns whether a stop string ended the
sequence, then asks ``get_next_output_text`` for the text to stream.

Decoding the whole output every step would cost O(length) per token, so only a short
window of tokens is decoded: ``decode(window) - decode(window[:num_read])`` is the new
text. The window starts at the last point where the text ended on a whole character, so
a character whose bytes are spread over several tokens is held back until complete.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from tandem.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Prompt tokens decoded ahead of the output: tokenizers that strip the leading space of
# a decoded string (SentencePiece's Metaspace) would otherwise drop the first output
# token's space. A handful is enough for any decoder's context.
_NUM_PROMPT_CONTEXT_TOKENS = 5

# A character is at most 4 UTF-8 bytes, so at most 4 tokens. When more tokens than this
# still leave the text ending in U+FFFD, the replacement character is real (invalid
# bytes, or the model produced U+FFFD itself) and waiting longer would only make every
# step decode a longer window.
_MAX_PENDING_TOKENS = 8

_REPLACEMENT_CHAR = "\ufffd"

Decode = Callable[[list[int]], str]


def _make_decode(
    tokenizer: PreTrainedTokenizerBase,
    skip_special_tokens: bool,
    spaces_between_special_tokens: bool,
) -> Decode:
    """A function decoding a list of ids with fixed options, as fast as the tokenizer allows."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        # This runs twice per generated token. Fast tokenizers ignore
        # spaces_between_special_tokens, and without the clean-up step transformers'
        # decode is exactly the Rust decode plus several microseconds of Python.
        return lambda ids: backend.decode(ids, skip_special_tokens=skip_special_tokens)
    return lambda ids: tokenizer.decode(
        ids,
        skip_special_tokens=skip_special_tokens,
        spaces_between_special_tokens=spaces_between_special_tokens,
    )


class IncrementalDetokenizer:
    """The text of one output sequence, built token by token, cut at stop strings."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_token_ids: list[int],
        params: SamplingParams,
    ) -> None:
        self._decode = _make_decode(
            tokenizer, params.skip_special_tokens, params.spaces_between_special_tokens
        )
        # Logprobs show every candidate, special tokens included.
        self._decode_all = _make_decode(tokenizer, False, params.spaces_between_special_tokens)
        self._stop: list[str] = list(params.stop or [])
        self._include_stop = params.include_stop_str_in_output
        # Characters that could be the start of a stop string still to complete. When the
        # stop string is to be included there is nothing to hide.
        longest_stop = max((len(s) for s in self._stop), default=0)
        self._num_held_chars = 0 if self._include_stop else max(longest_stop - 1, 0)

        # Tokens from the start of the decode window; the first num_read are already in
        # the text, the rest wait for a character to complete.
        context = list(prompt_token_ids[-_NUM_PROMPT_CONTEXT_TOKENS:])
        if self._decode(context).endswith(_REPLACEMENT_CHAR):
            # A prompt ending inside a character would merge its bytes with the output's
            # first bytes; the output is decoded on its own instead.
            context = []
        self._window: list[int] = context
        self._num_read = len(context)
        self._text = ""
        self._num_sent_chars = 0
        self._stop_string: str | None = None

    @property
    def output_text(self) -> str:
        """All text so far: cut at a matched stop string, without a pending partial character."""
        return self._text

    @property
    def stop_string(self) -> str | None:
        """The stop string that ended this sequence, if one did."""
        return self._stop_string

    def update(self, new_token_ids: list[int]) -> str | None:
        """Append newly generated tokens, extend the text, and check stop strings.

        Returns the stop string that matched, or None. On a match the text is cut: the stop
        string and everything after it are removed, or, with include_stop_str_in_output,
        kept up to the end of the stop string. When several match, the one completed first
        in the text wins, so the answer does not depend on how many tokens one update brings.
        """
        if self._stop_string is not None:
            raise RuntimeError(
                f"update() called after stop string {self._stop_string!r} ended the sequence"
            )
        num_chars_before = len(self._text)
        for token_id in new_token_ids:
            self._window.append(token_id)
            self._read_pending(force=len(self._window) - self._num_read > _MAX_PENDING_TOKENS)
        if not self._stop or len(self._text) == num_chars_before:
            return None
        return self._check_stop(num_chars_before)

    def get_next_output_text(self, finished: bool, delta: bool) -> str:
        """Text to emit now: all of it (delta=False) or what is new since the last delta call.

        While not finished, the last (longest stop string - 1) characters are held back
        when stop strings are set and not included in the output, so that the start of a
        stop string never reaches a client. When finished, tokens still waiting for a
        character to complete are decoded as they stand (U+FFFD for the missing bytes),
        as ``tokenizer.decode`` would.
        """
        if finished and self._stop_string is None and self._num_read < len(self._window):
            self._read_pending(force=True)
        # After a stop string the text is final: nothing more can complete one.
        done = finished or self._stop_string is not None
        num_held = 0 if done else self._num_held_chars
        end = max(len(self._text) - num_held, 0)
        if not delta:
            return self._text[:end]
        if end <= self._num_sent_chars:
            return ""
        text = self._text[self._num_sent_chars : end]
        self._num_sent_chars = end
        return text

    def decode_token(self, token_id: int) -> str:
        """One token's text for logprobs display, special tokens shown by name.

        Decoded after the recent output so a leading space survives tokenizers that strip
        one at the start of a string; a token holding part of a character shows U+FFFD.
        """
        context = self._window[: self._num_read]
        return self._decode_all([*context, token_id])[len(self._decode_all(context)) :]

    def _read_pending(self, force: bool) -> None:
        """Move the window's pending tokens into the text once they end on a whole character."""
        prefix_text = self._decode(self._window[: self._num_read])
        text = self._decode(self._window)
        complete = len(text) > len(prefix_text) and not text.endswith(_REPLACEMENT_CHAR)
        if not (complete or force):
            return
        self._text += text[len(prefix_text) :]
        # The tokens just read become the next window's context.
        self._window = self._window[self._num_read :]
        self._num_read = len(self._window)

    def _check_stop(self, num_chars_before: int) -> str | None:
        """Find the stop string completed first in the new text and cut the text there."""
        best: tuple[int, int, str] | None = None  # (end, start, stop string)
        for stop in self._stop:
            # A match must end in the new text, so it starts at most len(stop) - 1
            # characters before it.
            start = self._text.find(stop, max(num_chars_before - len(stop) + 1, 0))
            if start < 0:
                continue
            candidate = (start + len(stop), start, stop)
            if best is None or candidate[:2] < best[:2]:
                best = candidate
        if best is None:
            return None
        end, start, stop = best
        self._text = self._text[: end if self._include_stop else start]
        self._stop_string = stop
        return stop
