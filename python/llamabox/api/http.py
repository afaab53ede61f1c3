"""Minimal ASGI plumbing: request, responses, routing table, body limit, CORS and API keys."""

from __future__ import annotations

import asyncio
import hmac
import itertools
import os
import re
import sys
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, MutableMapping
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Generic, TypeVar
from urllib.parse import parse_qsl

import msgspec

from llamabox.api.errors import APIError
from llamabox.types import InvalidRequestError

__all__ = [
    "ClientDisconnected",
    "Headers",
    "Message",
    "Receive",
    "Request",
    "Response",
    "Route",
    "Router",
    "Scope",
    "Send",
    "StreamResponse",
    "api_key_ok",
    "cors_headers",
    "json_response",
    "new_id",
    "read_body",
    "request_id_from",
    "send_response",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

JSON = "application/json"
_encoder = msgspec.json.Encoder()
T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client went away before the response was complete."""


class Request:
    """What a handler sees: method, path, headers (lower-case names), query, body, ids."""

    __slots__ = ("body", "headers", "method", "path", "path_params", "query_string", "request_id")

    def __init__(self, scope: Scope) -> None:
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self.query_string: bytes = scope.get("query_string", b"")
        self.headers: dict[str, str] = {
            k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]
        }
        self.request_id = request_id_from(self.headers)
        self.path_params: dict[str, str] = {}
        self.body = b""

    @property
    def query(self) -> dict[str, str]:
        return dict(parse_qsl(self.query_string.decode("latin-1")))

    def decode(self, decoder: msgspec.json.Decoder[T]) -> T:
        """The body decoded as JSON into ``decoder``'s type. A body that is not JSON gets our
        own message (400); a shape or range error is msgspec's ValidationError (400, the
        field named)."""
        try:
            return decoder.decode(self.body)
        except msgspec.ValidationError:
            raise
        except (msgspec.DecodeError, UnicodeDecodeError) as e:
            raise InvalidRequestError(_not_json(self.body, e)) from None
        except RecursionError:
            raise InvalidRequestError("the request body is JSON nested too deeply") from None


class Response:
    __slots__ = ("body", "content_type", "headers", "status")

    def __init__(
        self,
        body: bytes,
        status: int = 200,
        content_type: str = JSON,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.body = body
        self.status = status
        self.content_type = content_type
        self.headers = headers or {}


class StreamResponse:
    """A 200 whose body comes from ``chunks``; closed (``aclose``) however sending ends."""

    __slots__ = ("chunks", "content_type", "headers", "status")

    def __init__(
        self,
        chunks: AsyncGenerator[bytes, None],
        content_type: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.chunks = chunks
        self.status = 200
        self.content_type = content_type
        self.headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})}


def _not_json(body: bytes, error: Exception) -> str:
    """Why ``body`` did not decode, in our words (msgspec's own wording changes by release)."""
    if not body.strip():
        return "the request body is empty: a JSON object is expected"
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"the request body is not valid UTF-8 (byte {e.start})"
    return f"the request body is not valid JSON ({error})"


def json_response(obj: Any, status: int = 200) -> Response:
    return Response(_encoder.encode(obj), status)


def _header_list(content_type: str, headers: dict[str, str], extra: Headers) -> Headers:
    out = [(b"content-type", content_type.encode())]
    out += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    out += extra
    return out


async def send_response(send: Send, response: Response | StreamResponse, extra: Headers) -> None:
    headers = _header_list(response.content_type, response.headers, extra)
    if isinstance(response, Response):
        headers.append((b"content-length", str(len(response.body)).encode()))
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        await send({"type": "http.response.body", "body": response.body})
        return
    async with aclosing(response.chunks) as chunks:
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        async for chunk in chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def read_body(receive: Receive, request: Request, limit: int, timeout: float) -> bytes:
    """The whole body, or 413 past ``limit`` bytes (checked on Content-Length first); a body
    not received within ``timeout`` seconds raises TimeoutError."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        # Read the rest (up to a bound) before answering: a client still sending its body
        # would otherwise see the connection reset instead of the 413.
        if int(declared) <= _DRAIN_MAX:
            await _within(timeout, _drain(receive))
        raise _too_large(limit)
    return await _within(timeout, _read_body(receive, limit))


if sys.version_info >= (3, 11):

    async def _within(seconds: float, work: Awaitable[T]) -> T:
        # asyncio.timeout costs a timer; wait_for (3.10) a task more, on every request.
        async with asyncio.timeout(seconds):
            return await work

else:

    async def _within(seconds: float, work: Awaitable[T]) -> T:
        return await asyncio.wait_for(work, seconds)


_DRAIN_MAX = 256 * 1024 * 1024


async def _drain(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect" or not message.get("more_body", False):
            return


async def _read_body(receive: Receive, limit: int) -> bytes:
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            if message.get("more_body", False):
                await _drain(receive)
            raise _too_large(limit)
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


def _too_large(limit: int) -> APIError:
    return APIError(413, f"Request body is larger than the limit of {limit} bytes")


_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


# Fresh ids: unique within the process (a counter) and across restarts (a random prefix), and
# cheap: uuid4() reads the OS's randomness on every request.
_ID_PREFIX = os.urandom(6).hex()
_ids = itertools.count(1)


def new_id() -> str:
    return f"{_ID_PREFIX}{next(_ids):08x}"


def request_id_from(headers: dict[str, str]) -> str:
    """The client's X-Request-ID when it is a sane token, else a fresh one."""
    given = headers.get("x-request-id")
    if given and _REQUEST_ID_OK.match(given):
        return given
    return new_id()


def api_key_ok(headers: dict[str, str], keys: list[bytes]) -> bool:
    """``Authorization: Bearer <key>`` or ``X-Api-Key: <key>``, compared in constant time."""
    given: list[str] = []
    if "x-api-key" in headers:
        given.append(headers["x-api-key"].strip())
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        given.append(token.strip())
    ok = False
    for candidate in given:
        raw = candidate.encode("latin-1", "replace")
        for key in keys:  # no early exit: the time taken does not depend on which key matched
            ok |= hmac.compare_digest(raw, key)
    return ok


CORS_ALLOW_HEADERS = (
    "authorization, content-type, x-api-key, x-request-id, x-request-tokens-per-second"
)


def cors_headers(origin: str | None, allowed: list[str], preflight: bool) -> Headers:
    if origin is None or not allowed or ("*" not in allowed and origin not in allowed):
        return []
    out: Headers = [
        (b"access-control-allow-origin", origin.encode("latin-1")),
        (b"access-control-expose-headers", b"x-request-id, retry-after"),
        (b"vary", b"Origin"),
    ]
    if preflight:
        out += [
            (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
            (b"access-control-allow-headers", CORS_ALLOW_HEADERS.encode()),
            (b"access-control-max-age", b"86400"),
        ]
    return out


S = TypeVar("S")
Handler = Callable[[Request, S], Awaitable[Response | StreamResponse]]


@dataclass(frozen=True)
class Route(Generic[S]):
    method: str
    path: str  # literal, or with one trailing "{name}" segment that takes the rest of the path
    handler: Handler[S]
    public: bool = False  # answers without an API key
    needs_model: bool = True  # 503 "Loading model" until the engine is loaded
    generates: bool = False  # cancelled when the client disconnects
    ollama: bool = False  # errors in Ollama's shape
    # Several models: the handler picks its model itself (AppState.use_model, by the body's
    # `model`); else the app gives it the state of the `?model=` one (default: the first).
    picks_model: bool = False
    autoload: bool = True  # several models: a request for an unloaded one loads it


_PARAM = re.compile(r"\{(\w+)\}$")


class Router(Generic[S]):
    """Exact paths in a dict; a few prefix routes with one trailing parameter."""

    def __init__(self, routes: Iterable[Route[S]]) -> None:
        self._exact: dict[str, dict[str, Route[S]]] = {}
        self._prefix: list[tuple[str, str, dict[str, Route[S]]]] = []
        for route in routes:
            match = _PARAM.search(route.path)
            if match is None:
                self._exact.setdefault(route.path, {})[route.method] = route
                continue
            prefix = route.path[: match.start()]
            for known_prefix, name, by_method in self._prefix:
                if known_prefix == prefix and name == match.group(1):
                    by_method[route.method] = route
                    break
            else:
                self._prefix.append((prefix, match.group(1), {route.method: route}))

    def _lookup(self, path: str) -> tuple[dict[str, Route[S]], dict[str, str]] | None:
        by_method = self._exact.get(path)
        if by_method is not None:
            return by_method, {}
        for prefix, name, by_method in self._prefix:
            if path.startswith(prefix) and len(path) > len(prefix):
                return by_method, {name: path[len(prefix) :]}
        return None

    def allowed_methods(self, path: str) -> list[str] | None:
        found = self._lookup(path)
        return sorted(found[0]) if found else None

    def match(self, method: str, path: str) -> tuple[Route[S], dict[str, str]]:
        found = self._lookup(path)
        if found is None:
            raise APIError(404, f"File Not Found: {method} {path}")
        by_method, params = found
        route = by_method.get(method)
        if route is None:
            allow = ", ".join(sorted(by_method))
            raise APIError(405, f"Method {method} not allowed on {path}", headers={"Allow": allow})
        return route, params
