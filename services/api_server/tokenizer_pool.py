"""Tokenizing off the event loop, on several threads, each with its own tokenizer copy.

One shared thread (what the server had) tokenizes in arrival order, so one large request
holds every later one for as long as it takes. The Rust tokenizer releases the GIL while it
encodes, so threads run side by side; each has its own copy because one HF fast tokenizer
used from two threads at once can fail ("Already borrowed").

``max_text_chars`` bounds what is worth tokenizing at all: a token covers at most
``max_token_chars`` characters of text (the longest token string in the vocabulary; for
byte-level BPE a token string holds one character per byte, for SentencePiece one per
character), so a text at least ``max_model_len * max_token_chars`` characters long has at
least ``max_model_len`` tokens and is refused without being tokenized.
"""

from __future__ import annotations

import asyncio
import copy
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


def max_token_chars(tokenizer: Any) -> int:
    """The most characters of text one token of ``tokenizer`` can stand for."""
    vocab = tokenizer.get_vocab()
    return max((len(token) for token in vocab), default=1)


class TokenizerPool:
    def __init__(self, tokenizer: Any, num_threads: int, max_model_len: int) -> None:
        if num_threads < 1:
            raise ValueError(f"tokenizer threads must be >= 1, got {num_threads}")
        self._source = tokenizer
        self._local = threading.local()
        self._lock = threading.Lock()  # deepcopy reads the source: one copy at a time
        self._executor = ThreadPoolExecutor(num_threads, thread_name_prefix="tandem-tokenizer")
        self.max_text_chars = max_model_len * max_token_chars(tokenizer)

    def _tokenizer(self) -> Any:
        tokenizer = getattr(self._local, "tokenizer", None)
        if tokenizer is None:
            with self._lock:
                tokenizer = self._local.tokenizer = copy.deepcopy(self._source)
        return tokenizer

    async def run(self, fn: Callable[[Any], T]) -> T:
        """``fn(tokenizer)`` on a tokenizer thread, with that thread's own copy."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(self._tokenizer()))
