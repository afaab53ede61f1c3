"""One table from exceptions to HTTP status and OpenAI error type, and the error bodies.

OpenAI routes answer ``{"error": {"message", "type", "param", "code"}}``; ``code`` is OpenAI's
string code where OpenAI has one (``context_length_exceeded``, ``invalid_api_key``,
``model_not_found``), else the HTTP status as llama.cpp and LLaMA Box send it. Ollama routes
answer Ollama's ``{"error": "message"}``.
"""

from __future__ import annotations

import logging
import re

import msgspec

from llamabox.types import (
    ContextLengthError,
    EngineStoppedError,
    GenerationError,
    InvalidRequestError,
    LlamaboxError,
    ModelLoadError,
    QueueFullError,
)

__all__ = ["APIError", "ErrorBody", "ErrorDetail", "error_body", "from_exception", "ollama_body"]

logger = logging.getLogger("llamabox.http")

RETRY_AFTER_SECONDS = "1"


class APIError(Exception):
    """An error answered as-is: raised by handlers and by :func:`from_exception`."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str | None = None,
        *,
        param: str | None = None,
        code: str | int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _TYPE_BY_STATUS.get(status, "server_error")
        self.param = param
        self.code: str | int = code if code is not None else status
        self.headers = headers or {}


# llama.cpp's error type names, which OpenAI's SDKs accept (they dispatch on status only).
_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    500: "server_error",
    501: "not_supported_error",
    503: "unavailable_error",
}

# Most specific first: the first entry the exception is an instance of wins.
# (exception, HTTP status, OpenAI code, extra headers)
_TABLE: tuple[tuple[type[BaseException], int, str | None, dict[str, str]], ...] = (
    (ContextLengthError, 400, "context_length_exceeded", {}),
    (InvalidRequestError, 400, None, {}),
    (msgspec.ValidationError, 400, None, {}),
    (msgspec.DecodeError, 400, None, {}),
    (QueueFullError, 503, None, {"Retry-After": RETRY_AFTER_SECONDS}),
    (EngineStoppedError, 503, None, {"Retry-After": RETRY_AFTER_SECONDS}),
    (GenerationError, 500, None, {}),
    (ModelLoadError, 500, None, {}),
    (LlamaboxError, 500, None, {}),
)

# msgspec: "Expected `int`, got `str` - at `$.messages[0].role`"
#          "Object missing required field `role` - at `$.messages[0]`"
_AT_PATH = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")
_MISSING_FIELD = re.compile(r"^Object missing required field `(?P<field>[^`]+)`")


def _validation_param(message: str) -> str | None:
    match = _AT_PATH.search(message)
    path = match.group("path") if match else ""
    missing = _MISSING_FIELD.match(message)
    if missing:
        path = f"{path}.{missing.group('field')}" if path else missing.group("field")
    return path or None


def from_exception(exc: BaseException) -> APIError:
    """The APIError to answer for ``exc``; unknown exceptions become a logged 500."""
    if isinstance(exc, APIError):
        return exc
    entry = next((e for e in _TABLE if isinstance(exc, e[0])), None)
    if entry is None:
        logger.error("unhandled error", exc_info=exc)
        return APIError(500, "Internal server error")
    _, status, code, headers = entry
    message = str(exc)
    param: str | None = None
    if isinstance(exc, InvalidRequestError):
        param = exc.param
    elif isinstance(exc, msgspec.ValidationError):
        param = _validation_param(message)
    elif isinstance(exc, msgspec.DecodeError):
        message = f"invalid JSON: {message}"
    elif isinstance(exc, QueueFullError):
        message = message or "Server busy: every slot is taken and the queue is full"
    elif status >= 500:
        logger.error("request failed: %s", message)
    return APIError(status, message, param=param, code=code, headers=dict(headers))


class ErrorDetail(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str | int


class ErrorBody(msgspec.Struct):
    error: ErrorDetail


class _OllamaErrorBody(msgspec.Struct):
    error: str


_encoder = msgspec.json.Encoder()


def error_body(err: APIError) -> bytes:
    return _encoder.encode(ErrorBody(ErrorDetail(err.message, err.type, err.param, err.code)))


def ollama_body(err: APIError) -> bytes:
    return _encoder.encode(_OllamaErrorBody(err.message))
