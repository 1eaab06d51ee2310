"""One streamed request to an OpenAI-compatible server, timed chunk by chunk.

Second stage of the benchmark: the runner hands each ``RequestInput`` to ``send_request``,
which posts it to ``/v1/completions`` or ``/v1/chat/completions`` with ``stream: true``
and ``stream_options.include_usage``, reads the server-sent events, and returns a
``RequestOutput``: time to first token, the gaps between later chunks, and the token
counts the server reports in its final ``usage`` chunk. Nothing here is Tandem-specific.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from typing import Any

import aiohttp


@dataclasses.dataclass(frozen=True)
class RequestInput:
    api_url: str
    model: str
    prompt: str
    prompt_len: int
    output_len: int
    chat: bool
    ignore_eos: bool = False
    # Sampling parameters and anything from --extra-body, merged into the JSON body.
    extra_body: dict[str, Any] = dataclasses.field(default_factory=dict)
    headers: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class RequestOutput:
    success: bool = False
    generated_text: str = ""
    # The client-side prompt length; replaced by the server's usage.prompt_tokens.
    prompt_len: int = 0
    # usage.completion_tokens, or None when the server sent no usage.
    output_tokens: int | None = None
    ttft: float = 0.0  # seconds from sending to the first chunk with a choice
    itl: list[float] = dataclasses.field(default_factory=list)  # gaps between later chunks
    latency: float = 0.0  # seconds from sending to the last chunk with a choice
    start_time: float = 0.0  # time.perf_counter() when the request was sent
    error: str = ""


class SSEDecoder:
    """Splits a byte stream into server-sent-event data payloads.

    Network reads cut anywhere (mid-line, mid-UTF-8 character), so bytes are buffered
    until an event's blank line arrives; comments (``: ping``) and non-data fields are
    dropped.
    """

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[str]:
        # Normalized on the whole buffer: a read can end between the \r and the \n.
        self._buffer = (self._buffer + chunk).replace(b"\r\n", b"\n")
        payloads = []
        while b"\n\n" in self._buffer:
            event, self._buffer = self._buffer.split(b"\n\n", 1)
            data = [
                line[5:].removeprefix(b" ")
                for line in event.split(b"\n")
                if line.startswith(b"data:")
            ]
            if data:
                payloads.append(b"\n".join(data).decode("utf-8"))
        return payloads

    def flush(self) -> list[str]:
        """Payloads of a last event the server closed without a blank line."""
        return self.feed(b"\n\n") if self._buffer.strip() else []


def build_payload(request: RequestInput) -> dict[str, Any]:
    payload: dict[str, Any] = {"model": request.model, "stream": True}
    if request.chat:
        # A plain string content: every OpenAI-compatible server takes it, while the
        # list-of-parts form is not universal.
        payload["messages"] = [{"role": "user", "content": request.prompt}]
        payload["max_completion_tokens"] = request.output_len
    else:
        payload["prompt"] = request.prompt
        payload["max_tokens"] = request.output_len
    payload["stream_options"] = {"include_usage": True}
    if request.ignore_eos:
        # Sent only when asked: strict servers (OpenAI itself) refuse unknown fields.
        payload["ignore_eos"] = True
    payload.update(request.extra_body)
    return payload


def _choice_text(choice: dict[str, Any], chat: bool) -> str | None:
    """The text a streamed choice carries, or None for a chat chunk that only opens the
    assistant's turn (role, no content), which is not a token."""
    if not chat:
        return choice.get("text") or ""
    delta = choice.get("delta") or {}
    text = delta.get("content") or delta.get("reasoning_content") or ""
    if not text and "role" in delta and not choice.get("finish_reason"):
        return None
    return text


class StreamTimer:
    """Folds the payloads of one response into a ``RequestOutput``; ``now`` is the
    arrival time of the payloads being fed, so tests can drive it with a fake clock."""

    def __init__(self, output: RequestOutput, chat: bool) -> None:
        self.output = output
        self._chat = chat
        self._last_token_time = output.start_time
        self._pieces: list[str] = []  # one per token chunk, empty strings included

    def feed(self, payload: str, now: float) -> None:
        if payload.strip() == "[DONE]":
            return
        data = json.loads(payload)
        if usage := data.get("usage"):
            # Servers that stream usage on every chunk end with the totals; keep the last.
            if usage.get("completion_tokens") is not None:
                self.output.output_tokens = int(usage["completion_tokens"])
            if usage.get("prompt_tokens") is not None:
                self.output.prompt_len = int(usage["prompt_tokens"])
        choices = data.get("choices")
        if not choices:
            return
        text = _choice_text(choices[0], self._chat)
        if text is None:
            return
        if not self._pieces:
            self.output.ttft = now - self.output.start_time
        else:
            self.output.itl.append(now - self._last_token_time)
        self._last_token_time = now
        self._pieces.append(text)

    def finish(self) -> RequestOutput:
        self.output.generated_text = "".join(self._pieces)
        self.output.latency = self._last_token_time - self.output.start_time
        self.output.success = bool(self._pieces)
        if not self.output.success:
            self.output.error = "the stream ended without a single chunk with a choice"
        return self.output


async def send_request(session: aiohttp.ClientSession, request: RequestInput) -> RequestOutput:
    """Posts one streamed request; failures come back as ``success=False`` with the
    reason in ``error``, so one bad request does not end the run."""
    output = RequestOutput(prompt_len=request.prompt_len)
    headers = {"Content-Type": "application/json", **request.headers}
    output.start_time = time.perf_counter()
    timer = StreamTimer(output, request.chat)
    decoder = SSEDecoder()
    try:
        async with session.post(
            request.api_url, json=build_payload(request), headers=headers
        ) as response:
            if response.status != 200:
                body = (await response.text())[:500]
                output.error = f"HTTP {response.status} {response.reason}: {body}"
                return output
            async for chunk in response.content.iter_any():
                now = time.perf_counter()
                for payload in decoder.feed(chunk):
                    timer.feed(payload, now)
            for payload in decoder.flush():
                timer.feed(payload, time.perf_counter())
        return timer.finish()
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        # ValueError covers a payload that is not JSON; asyncio.TimeoutError is not the
        # builtin TimeoutError before Python 3.11.
        output.success = False
        output.error = f"{type(exc).__name__}: {exc}"
        return output


async def first_model_id(session: aiohttp.ClientSession, base_url: str) -> str:
    """The first model ``GET /v1/models`` lists: what to name when --model is not given."""
    url = f"{base_url}/v1/models"
    try:
        async with session.get(url) as response:
            response.raise_for_status()
            models = (await response.json()).get("data") or []
    except aiohttp.ClientError as exc:
        raise RuntimeError(f"could not list models at {url} ({exc}); pass --model") from exc
    if not models:
        raise RuntimeError(f"{url} lists no models; pass --model")
    return str(models[0]["id"])
