"""OpenAI-shaped errors: every failure leaves the server as ``{"error": {message, type,
param, code}}`` with its HTTP status, whether it was raised by a handler, by request
validation, by Starlette's routing, or by a middleware before any route ran."""

from __future__ import annotations

import json
import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("tandem.api_server")

# A message that starts with its field ('top_p must be ...', 'messages.0.content: ...').
_FIELD_PREFIX = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*)(?::| must| may| is)")


class APIError(Exception):
    """An error a client gets back: status, message, and OpenAI's type / param / code."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.retry_after = retry_after  # seconds, sent as Retry-After

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def to_json(self) -> str:
        return json.dumps(self.body())

    def headers(self) -> dict[str, str]:
        return {} if self.retry_after is None else {"Retry-After": str(self.retry_after)}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status_code, headers=self.headers())


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def from_value_error(error: ValueError, renames: dict[str, str] | None = None) -> APIError:
    """A 400 from the engine's or SamplingParams' ValueError, whose message starts with
    the offending field ('top_p must be in (0, 1], got 2.0')."""
    message = str(error)
    match = _FIELD_PREFIX.match(message)
    param = match.group(1) if match else None
    if param and renames and param in renames:
        message = renames[param] + message[len(param) :]
        param = renames[param]
    return bad_request(message, param)


def model_not_found(name: str, served: tuple[str, ...]) -> APIError:
    return APIError(
        404,
        f"The model '{name}' does not exist; this server serves {list(served)}.",
        param="model",
        code="model_not_found",
    )


def unauthorized(reason: str) -> APIError:
    return APIError(
        401,
        f"{reason}; send 'Authorization: Bearer <key>' with the server's API key.",
        code="invalid_api_key",
    )


def engine_dead() -> APIError:
    return APIError(
        503,
        "The engine has died and cannot serve requests; restart the server (see its log).",
        type="server_error",
        code="engine_dead",
    )


def engine_unavailable(reason: str) -> APIError:
    return APIError(503, reason, type="server_error", code="engine_unavailable")


def overloaded(reason: str) -> APIError:
    """503 with Retry-After: the server is full now and may not be in a second."""
    return APIError(
        503, f"{reason}; retry later.", type="server_error", code="server_overloaded",
        retry_after=1,
    )  # fmt: skip


def body_too_large(limit: int) -> APIError:
    return APIError(
        413,
        f"The request body is larger than {limit} bytes (--max-request-body-bytes).",
        code="request_too_large",
    )


def headers_too_large(limit: int) -> APIError:
    return APIError(
        431,
        f"The request line and headers are larger than {limit} bytes "
        "(--h11-max-incomplete-event-size).",
        code="request_header_fields_too_large",
    )


class BodyError(StarletteHTTPException):
    """Raised while the body is read; FastAPI lets HTTPExceptions through unchanged."""

    def __init__(self, api_error: APIError) -> None:
        self.api_error = api_error
        super().__init__(api_error.status_code, api_error.message)


class BodyTooLarge(BodyError):
    def __init__(self, limit: int) -> None:
        super().__init__(body_too_large(limit))


class BodyTimeout(BodyError):
    def __init__(self, seconds: float) -> None:
        message = (
            f"The request body did not arrive within {seconds:g} s (shorter than its "
            "Content-Length?) (--body-read-timeout)."
        )
        super().__init__(APIError(408, message, code="request_timeout"))


def _validation_error(errors: list[dict]) -> APIError:
    first = errors[0] if errors else {}
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    if loc:
        param = ".".join(loc)
        message = f"{param}: {message}"
    else:  # a check across fields names its field first
        match = _FIELD_PREFIX.match(message)
        param = match.group(1) if match else None
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problems)"
    return bad_request(message, param)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, error: APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        return _validation_error(list(error.errors())).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, error: StarletteHTTPException) -> JSONResponse:
        if isinstance(error, BodyError):
            return error.api_error.response()
        kind = "invalid_request_error" if error.status_code < 500 else "server_error"
        return APIError(error.status_code, str(error.detail), type=kind).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, error: Exception) -> JSONResponse:
        logger.exception("unexpected error while handling a request")
        message = f"Internal server error ({type(error).__name__}); see the server log."
        return APIError(500, message, type="server_error").response()
