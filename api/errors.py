"""The one place errors become HTTP responses: in OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``, or for Anthropic's
Messages API (``/v1/messages``) in its shape,
``{"type": "error", "error": {"type", "message"}}``."""

from __future__ import annotations

import json
import logging
from typing import Any

from quart import Quart, Response, g, request
from werkzeug.exceptions import HTTPException

from scheduler import errors as e

log = logging.getLogger("mlxd.api")

# class -> (HTTP status, OpenAI error type, code). Subclasses are looked up
# before their bases (the walk below follows the MRO).
STATUS: dict[type[e.MlxdError], tuple[int, str, str | None]] = {
    e.InvalidRequest: (400, "invalid_request_error", None),
    e.ContextLengthExceeded: (400, "invalid_request_error", "context_length_exceeded"),
    e.RequestTooLarge: (400, "invalid_request_error", "request_too_large"),
    e.UnsupportedMediaType: (415, "invalid_request_error", "unsupported_media_type"),
    e.Unauthorized: (401, "invalid_request_error", "invalid_api_key"),
    e.Forbidden: (403, "invalid_request_error", "forbidden"),
    e.ModelNotFound: (404, "invalid_request_error", "model_not_found"),
    e.ResponseNotFound: (404, "invalid_request_error", "not_found"),
    e.ModelLoadFailed: (500, "server_error", "model_load_failed"),
    e.RunnerCrashed: (502, "server_error", "runner_crashed"),
    e.Overloaded: (503, "server_error", "overloaded"),
    e.QueueFull: (429, "rate_limit_error", "queue_full"),
    e.QueueTimeout: (503, "server_error", "queue_timeout"),
    e.ModelTooLarge: (503, "server_error", "model_too_large"),
    e.ShuttingDown: (503, "server_error", "shutting_down"),
}


def error_body(
    message: str, type_: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def describe(exc: e.MlxdError) -> tuple[int, dict[str, Any]]:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            status, type_, code = STATUS[cls]
            return status, error_body(exc.message, type_, exc.param, code)
    raise TypeError(f"{type(exc).__name__} has no HTTP mapping")


# HTTP status -> Anthropic's error type (the status stays the same).
ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    415: "invalid_request_error",
    429: "rate_limit_error",
    499: "invalid_request_error",
    503: "overloaded_error",
}


def anthropic(status: int, body: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI error body in Anthropic's shape."""
    kind = ANTHROPIC_TYPES.get(status, "api_error")
    return {"type": "error", "error": {"type": kind, "message": body["error"]["message"]}}


def _http_error(exc: HTTPException) -> tuple[int, dict[str, Any]]:
    status = exc.code or 500
    codes = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
    message = {
        404: "no such endpoint",
        413: "the request body is larger than the server accepts",
    }.get(status, exc.description or exc.name)
    type_ = "invalid_request_error" if status < 500 else "server_error"
    return status, error_body(message, type_, code=codes.get(status))


def install(app: Quart) -> None:
    @app.errorhandler(e.MlxdError)
    async def _mlxd(exc: e.MlxdError) -> Response:
        status, body = describe(exc)
        _noted(exc.message)
        response = _json(body, status)
        if isinstance(exc, e.QueueFull):
            response.headers["Retry-After"] = str(exc.retry_after_s)
        return response

    @app.errorhandler(HTTPException)
    async def _http(exc: HTTPException) -> Response:
        status, body = _http_error(exc)
        _noted(body["error"]["message"])
        response = _json(body, status)
        if status in (408, 413):
            # The rest of the body is never read: close the connection, so a
            # client still sending it gets this answer instead of waiting,
            # and one that sends nothing more is let go.
            response.headers["Connection"] = "close"
        return response

    @app.errorhandler(Exception)
    async def _unexpected(exc: Exception) -> Response:
        log.exception("unhandled error", exc_info=exc)
        return _json(error_body(f"internal error: {type(exc).__name__}", "server_error"), 500)


def _noted(message: str) -> None:
    """Put why a request was refused in its log line (``api/record.py``)."""
    record = g.get("record")
    if record is not None and not record.error:
        record.error = message


def _json(body: dict[str, Any], status: int) -> Response:
    if request.path.startswith("/v1/messages"):
        body = anthropic(status, body)
    return Response(json.dumps(body), status=status, content_type="application/json")
