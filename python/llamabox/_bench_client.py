"""The client of ``llamabox bench``: one streaming request, sent and timed.

The standard library's asyncio streams with HTTP/1.1 and SSE parsed here: no dependency, a
timestamp as each piece of a stream arrives (before any parsing), and hundreds of streams on one
thread. A :class:`Connection` is one client's keep-alive connection: a request on a kept-alive
connection that the server has closed meanwhile is sent once more on a new one. Bodies are read
chunked, by Content-Length, or up to the end; the events' data are decoded as OpenAI's
``/v1/completions`` and ``/v1/chat/completions`` chunks (text, reasoning, usage, error).

:mod:`llamabox.benchmark` re-exports the public names (``Target``, ``RequestResult``,
``SSEParser``, ``stream_one``) and says what the times mean.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import urlsplit

import msgspec

__all__ = [
    "ConnectError",
    "Connection",
    "RequestResult",
    "SSEParser",
    "Target",
    "served_model",
    "stream_one",
    "stream_request",
]

_NAN = float("nan")
_MAX_ERROR_BODY = 64 * 1024


class Target(msgspec.Struct, frozen=True, kw_only=True):
    """One OpenAI-compatible server: where its ``/v1`` routes are, and how to ask."""

    scheme: str = "http"
    host: str
    port: int
    host_header: str
    base_path: str = "/v1"
    chat: bool = False
    api_key: str | None = None
    timeout_s: float = 600.0

    @classmethod
    def from_url(
        cls, url: str, *, chat: bool = False, api_key: str | None = None, timeout_s: float = 600.0
    ) -> Target:
        """``http(s)://host[:port][/prefix][/v1]``: the routes are under ``/prefix/v1``."""
        parts = urlsplit(url.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http:// or https:// URL: {url!r}")
        path = parts.path.rstrip("/")
        if path.endswith("/completions"):
            raise ValueError(f"give the server's base URL (http://host:port[/v1]), not {path}")
        if not path.endswith("/v1"):
            path += "/v1"
        default_port = 443 if parts.scheme == "https" else 80
        return cls(
            scheme=parts.scheme,
            host=parts.hostname,
            port=parts.port or default_port,
            host_header=parts.netloc.rpartition("@")[2],
            base_path=path,
            chat=chat,
            api_key=api_key,
            timeout_s=timeout_s,
        )

    @property
    def path(self) -> str:
        return self.base_path + ("/chat/completions" if self.chat else "/completions")

    @property
    def origin(self) -> str:
        return f"{self.scheme}://{self.host_header}"


class RequestResult(msgspec.Struct, kw_only=True):
    """One streamed request. Times are seconds; ``chunk_times_s`` are from the start."""

    ok: bool
    error: str = ""
    start_s: float = 0.0  # perf_counter() when the request was sent
    ttft_s: float = _NAN
    e2e_s: float = _NAN
    chunk_times_s: list[float] = []  # arrival of each chunk that carries text
    output_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    tokens_from_usage: bool = False

    @property
    def tpot_s(self) -> float:
        """Time per output token after the first; NaN for fewer than two tokens."""
        if self.output_tokens < 2 or not self.chunk_times_s:
            return _NAN
        return (self.chunk_times_s[-1] - self.chunk_times_s[0]) / (self.output_tokens - 1)


# ---------------------------------------------------------------- HTTP/1.1 and SSE


class _ProtocolError(Exception):
    """The server's answer is not HTTP/1.1 or SSE as expected."""


class ConnectError(Exception):
    """The server cannot be reached."""


class Connection:
    """One client's keep-alive connection; opened on first use and after a failure."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        t = self.target
        context = ssl.create_default_context() if t.scheme == "https" else None
        try:
            self.reader, self.writer = await asyncio.open_connection(
                t.host, t.port, ssl=context, limit=1 << 20
            )
        except OSError as e:
            raise ConnectError(f"cannot connect to {t.origin}: {e.strerror or e}") from None
        return self.reader, self.writer

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def _request_head(target: Target, method: str, path: str, n_body: int) -> bytes:
    lines = [
        f"{method} {path} HTTP/1.1",
        f"Host: {target.host_header}",
        "User-Agent: llamabox-bench",
        "Accept: text/event-stream, application/json",
    ]
    if n_body:
        lines += ["Content-Type: application/json", f"Content-Length: {n_body}"]
    if target.api_key:
        lines.append(f"Authorization: Bearer {target.api_key}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _exchange(
    conn: Connection, method: str, path: str, body: bytes
) -> tuple[asyncio.StreamReader, int, dict[str, str]]:
    """Send a request and read the response's head: (reader, status, lowercase headers).

    A kept-alive connection that the server has closed meanwhile fails before any answer: the
    request is sent once more on a new connection.
    """
    data = _request_head(conn.target, method, path, len(body)) + body
    while True:
        fresh = conn.writer is None
        reader, writer = (conn.reader, conn.writer) if not fresh else await conn.open()
        assert reader is not None and writer is not None
        try:
            writer.write(data)
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            break
        except (ConnectionError, asyncio.IncompleteReadError):
            conn.close()
            if fresh:
                raise
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    version, _, rest = status_line.partition(" ")
    if not version.startswith("HTTP/1.") or not rest[:3].isdigit():
        raise _ProtocolError(f"not an HTTP/1.x response: {status_line[:80]!r}")
    headers: dict[str, str] = {}
    for line in header_lines:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    if version == "HTTP/1.0" or headers.get("connection", "").lower() == "close":
        headers["connection"] = "close"
    return reader, int(rest[:3]), headers


async def _body(reader: asyncio.StreamReader, headers: Mapping[str, str]) -> AsyncIterator[bytes]:
    """The body's pieces as they arrive (chunked, Content-Length, or up to the end)."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size_line = await reader.readuntil(b"\r\n")
            try:
                size = int(size_line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise _ProtocolError(f"bad chunk size {size_line[:40]!r}") from None
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                    pass
                return
            piece = await reader.readexactly(size + 2)
            yield piece[:-2]
    elif "content-length" in headers:
        left = int(headers["content-length"])
        while left > 0:
            piece = await reader.read(min(left, 1 << 16))
            if not piece:
                raise asyncio.IncompleteReadError(b"", left)
            left -= len(piece)
            yield piece
    else:
        while piece := await reader.read(1 << 16):
            yield piece


class SSEParser:
    """Incremental ``text/event-stream`` parser: ``feed()`` returns the completed events' data."""

    def __init__(self) -> None:
        self._tail = b""
        self._data: list[bytes] = []

    def feed(self, piece: bytes) -> list[bytes]:
        *lines, self._tail = (self._tail + piece).split(b"\n")
        events = []
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                if self._data:
                    events.append(b"\n".join(self._data))
                    self._data = []
            elif line.startswith(b"data:"):
                value = line[5:]
                self._data.append(value[1:] if value.startswith(b" ") else value)
            # comments (":...") and the other fields (event, id, retry) carry nothing measured
        return events

    def close(self) -> list[bytes]:
        """The last event of a stream that ended without its blank line."""
        events = self.feed(b"\n\n") if self._tail or self._data else []
        self._tail = b""
        return events


class _Delta(msgspec.Struct):
    content: str | None = None
    reasoning_content: str | None = None  # llama.cpp's and DeepSeek's reasoning field
    reasoning: str | None = None  # vLLM's and Ollama's


class _Choice(msgspec.Struct):
    text: str | None = None
    delta: _Delta | None = None

    def has_text(self) -> bool:
        d = self.delta
        return bool(
            self.text or (d is not None and (d.content or d.reasoning_content or d.reasoning))
        )


class _PromptDetails(msgspec.Struct):
    cached_tokens: int | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    prompt_tokens_details: _PromptDetails | None = None


class _Chunk(msgspec.Struct):
    choices: list[_Choice] | None = None
    usage: _Usage | None = None
    error: Any = None


_chunk_decoder = msgspec.json.Decoder(_Chunk)


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _error_message(raw: bytes) -> str:
    """The message of an error body or event: OpenAI's, Ollama's or vLLM's shape, else text."""
    try:
        obj = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return _short(raw.decode("utf-8", errors="replace"))
    err = obj.get("error", obj) if isinstance(obj, dict) else obj
    if isinstance(err, dict) and "message" in err:
        err = err["message"]
    return _short(err if isinstance(err, str) else msgspec.json.encode(err).decode())


async def _stream(conn: Connection, payload: bytes, start: float) -> RequestResult:
    reader, status, headers = await _exchange(conn, "POST", conn.target.path, payload)
    keep = headers.get("connection") != "close" and (
        "content-length" in headers or "chunked" in headers.get("transfer-encoding", "").lower()
    )
    if status != 200:
        raw = b""
        async for piece in _body(reader, headers):
            raw += piece
            if len(raw) > _MAX_ERROR_BODY:
                keep = False
                break
        if not keep:
            conn.close()
        message = _error_message(raw) if raw else "(empty body)"
        return RequestResult(ok=False, error=f"HTTP {status}: {message}", start_s=start)
    content_type = headers.get("content-type", "")
    if not content_type.startswith("text/event-stream"):
        conn.close()
        error = f"not an event stream: Content-Type {content_type or '(none)'}"
        return RequestResult(ok=False, error=error, start_s=start)
    sse = SSEParser()
    times: list[float] = []
    usage: _Usage | None = None
    pieces = _body(reader, headers)
    ended = False
    while not ended:
        try:
            piece = await pieces.__anext__()
        except StopAsyncIteration:
            piece, ended = b"", True
        now = time.perf_counter() - start  # as the piece arrived, before any parsing
        events = sse.close() if ended else sse.feed(piece)
        for data in events:
            if data == b"[DONE]":
                continue  # read on to the body's end, so that the connection can be reused
            chunk = _chunk_decoder.decode(data)
            if chunk.error is not None:
                conn.close()
                message = _error_message(data)
                return RequestResult(ok=False, error=f"stream error: {message}", start_s=start)
            usage = chunk.usage or usage
            if chunk.choices and any(c.has_text() for c in chunk.choices):
                times.append(now)
    if not keep:
        conn.close()
    end = time.perf_counter() - start
    if not times:
        return RequestResult(ok=False, error="no text in the stream", start_s=start)
    n_usage = usage.completion_tokens if usage is not None else None
    details = usage.prompt_tokens_details if usage is not None else None
    return RequestResult(
        ok=True,
        start_s=start,
        ttft_s=times[0],
        e2e_s=end,
        chunk_times_s=times,
        output_tokens=len(times) if n_usage is None else n_usage,
        prompt_tokens=(usage.prompt_tokens or 0) if usage is not None else 0,
        cached_tokens=(details.cached_tokens or 0) if details is not None else 0,
        tokens_from_usage=n_usage is not None,
    )


async def stream_request(conn: Connection, body: Mapping[str, Any]) -> RequestResult:
    """One streaming request on ``conn``, which stays open for the next one if it can.

    Never raises for the server's doing: a failure is a result with ``ok=False`` (and closes
    ``conn``), its ``error`` saying why.
    """
    payload = msgspec.json.encode(body)
    start = time.perf_counter()
    try:
        return await asyncio.wait_for(_stream(conn, payload, start), conn.target.timeout_s)
    except asyncio.TimeoutError:
        error = f"timed out after {conn.target.timeout_s:g} s"
    except ConnectError as e:
        error = str(e)
    except asyncio.IncompleteReadError:
        error = "the server closed the connection mid-response"
    except asyncio.LimitOverrunError:
        error = "a line of the response is over 1 MiB"
    except (OSError, _ProtocolError, msgspec.DecodeError) as e:
        error = f"{type(e).__name__}: {_short(str(e))}"
    conn.close()
    return RequestResult(ok=False, error=error, start_s=start)


async def stream_one(target: Target, body: Mapping[str, Any]) -> RequestResult:
    """One streaming request on a connection of its own."""
    conn = Connection(target)
    try:
        return await stream_request(conn, body)
    finally:
        conn.close()


async def served_model(target: Target) -> str | None:
    """The first id of ``GET /v1/models``, or None; raises ConnectError when unreachable."""
    conn = Connection(target)
    try:
        reader, status, headers = await asyncio.wait_for(
            _exchange(conn, "GET", target.base_path + "/models", b""), 30.0
        )
        raw = b"".join([piece async for piece in _body(reader, headers)])
        if status != 200:
            return None
        data = msgspec.json.decode(raw).get("data") or []
        return str(data[0]["id"]) if data and isinstance(data[0], dict) else None
    except ConnectError:
        raise
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, _ProtocolError):
        return None
    except (msgspec.DecodeError, AttributeError, KeyError):
        return None
    finally:
        conn.close()
