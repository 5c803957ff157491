"""Errors in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, and their handlers."""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("gptoss_jax.serve")


class APIError(Exception):
    """An error a request gets back: HTTP status, message, OpenAI error type, the field, a code."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON body (also sent as a streamed chunk when a stream fails)."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    """A 400 naming the field."""
    return APIError(400, message, param=param, code=code)


def overloaded(message: str, retry_after_s: int = 1) -> APIError:
    """A 429 with Retry-After: the queue is full (the client retries it)."""
    return APIError(429, message, type="server_overloaded", code="queue_full",
                    headers={"Retry-After": str(retry_after_s)})


def unavailable(message: str, retry_after_s: int = 5) -> APIError:
    """A 503 with Retry-After: the engine is not ready or has failed."""
    return APIError(503, message, type="server_error", code="engine_unavailable",
                    headers={"Retry-After": str(retry_after_s)})


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "dict", "list", "none", "literal"})


def _is_union_tag(part: str) -> bool:
    return "[" in part or "-" in part or part in _TYPE_TAGS or part[:1].isupper()


def field_path(loc: Sequence[Any]) -> str | None:
    """Pydantic's ``("body", "messages", 0, "role")`` as OpenAI's ``messages[0].role``."""
    path = ""
    for part in loc:
        if part == "body" and not path:
            continue
        if isinstance(part, int):
            path += f"[{part}]"
        elif _is_union_tag(str(part)):
            continue  # which member of a union failed (e.g. "str", "list[Part]", "NamedToolChoice"): not a field
        else:
            path += f".{part}" if path else str(part)
    return path or None


def _validation_error(err: RequestValidationError) -> APIError:
    errors = err.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        first = next(e for e in errors if e.get("type") == "json_invalid")
        detail = first.get("ctx", {}).get("error", "")
        return bad_request(f"the request body is not valid JSON{': ' + detail if detail else ''}", None, "invalid_json")
    first = min(errors, key=lambda e: len(e.get("loc", ())))  # the outermost field that failed
    param = field_path(first.get("loc", ()))
    if first.get("type") == "missing":
        return bad_request(f"'{param}' is required", param, "missing_required_parameter")
    message = first.get("msg", "invalid value")
    return bad_request(f"invalid '{param}': {message}" if param else message, param)


def install(app: FastAPI, count: Callable[[Request, int], None] = lambda request, status: None) -> None:
    """Every error the app returns, including FastAPI's own, in OpenAI's shape; ``count`` sees each."""

    def reply(request: Request, api: APIError) -> JSONResponse:
        count(request, api.status)
        return JSONResponse(api.body(), status_code=api.status, headers=api.headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError) -> JSONResponse:
        return reply(request, err)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        return reply(request, _validation_error(err))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return reply(request, APIError(err.status_code, str(err.detail), type=kind, headers=getattr(err, "headers", None),
                                       code="not_found" if err.status_code == 404 else None))

    @app.exception_handler(Exception)
    async def _crash(request: Request, err: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return reply(request, APIError(500, f"internal error: {type(err).__name__}: {err}", type="server_error",
                                       code="internal_error"))
