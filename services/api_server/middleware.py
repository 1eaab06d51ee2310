"""The guard every HTTP request passes before a route: the request id, the body size limit
and the API key. Plain ASGI (not Starlette's BaseHTTPMiddleware), so streamed responses
and client disconnects pass through untouched."""

from __future__ import annotations

import asyncio
import hmac
import re
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send
from tandem.services.api_server.errors import (
    APIError,
    BodyTimeout,
    BodyTooLarge,
    bad_request,
    body_too_large,
    headers_too_large,
    overloaded,
    unauthorized,
)

REQUEST_ID_HEADER = b"x-request-id"
REQUEST_ID_KEY = "tandem.request_id"  # where routes find the id in the ASGI scope
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
# Paths that never need the API key: probes and scrapes.
_OPEN_PATHS = frozenset({"/health", "/metrics", "/version", "/ping"})


class GuardMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        api_key: str | None,
        max_body_bytes: int,
        max_header_bytes: int,
        body_timeout: float,
        max_concurrent_requests: int = 0,
    ) -> None:
        self.app = app
        self.max_concurrent = max_concurrent_requests  # /v1 requests at once; 0: no limit
        self.num_concurrent = 0
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.max_header_bytes = max_header_bytes
        self.body_timeout = body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        request_id = headers.get(REQUEST_ID_HEADER, b"").decode("latin-1") or uuid.uuid4().hex
        id_header = (REQUEST_ID_HEADER, request_id.encode("latin-1"))

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), id_header]
            await send(message)

        error = self._check(scope, headers, request_id)
        if error is not None:
            await _send_error(send_with_id, error)
            return
        scope[REQUEST_ID_KEY] = request_id
        if not scope["path"].startswith("/v1/"):
            await self.app(scope, self._limited(receive), send_with_id)
            return
        if self.max_concurrent and self.num_concurrent >= self.max_concurrent:
            reason = f"{self.num_concurrent} requests are in progress (--max-concurrent-requests)"
            await _send_error(send_with_id, overloaded(reason))
            return
        self.num_concurrent += 1
        try:
            await self.app(scope, self._limited(receive), send_with_id)
        finally:
            self.num_concurrent -= 1

    def _check(self, scope: Scope, headers: dict[bytes, bytes], request_id: str) -> APIError | None:
        # h11 enforces its limit only on a head that arrives in pieces; one read can bring
        # a larger one whole, so the limit is checked again on what was parsed.
        head = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
        head += sum(len(name) + len(value) + 4 for name, value in scope["headers"])
        if head > self.max_header_bytes:
            return headers_too_large(self.max_header_bytes)
        path = scope["path"]
        if not _REQUEST_ID_RE.match(request_id):
            return bad_request(
                "X-Request-Id: use 1 to 128 letters, digits or ._:- characters", "X-Request-Id"
            )
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return body_too_large(self.max_body_bytes)
        if self.api_key is None or path in _OPEN_PATHS:
            return None
        auth = headers.get(b"authorization")
        if auth is None:
            return unauthorized("Missing API key")
        scheme, _, key = auth.partition(b" ")
        # compare_digest: the time taken does not tell how much of the key was right.
        if scheme.lower() != b"bearer" or not hmac.compare_digest(key.strip(), self.api_key):
            return unauthorized("Incorrect API key")
        return None

    def _limited(self, receive: Receive) -> Receive:
        """``receive`` that counts body bytes (for bodies sent without Content-Length) and
        gives up on a body that stops arriving (shorter than its Content-Length, say)."""
        num_bytes = 0
        body_done = False

        async def limited() -> Message:
            nonlocal num_bytes, body_done
            if body_done:  # after the body only a disconnect comes, whenever it does
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout)
            except asyncio.TimeoutError:
                raise BodyTimeout(self.body_timeout) from None
            if message["type"] == "http.request":
                num_bytes += len(message.get("body", b""))
                if num_bytes > self.max_body_bytes:
                    raise BodyTooLarge(self.max_body_bytes)
                body_done = not message.get("more_body", False)
            return message

        return limited


async def _send_error(send: Send, error: APIError) -> None:
    body = error.to_json().encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(name.lower().encode(), value.encode()) for name, value in error.headers().items()]
    await send({"type": "http.response.start", "status": error.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})
