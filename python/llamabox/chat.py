"""``llamabox chat``: a terminal chat with a llamabox server (or any OpenAI-compatible one).

The successor of LLaMA Box's ``chat.sh``. Each line typed goes, with the conversation so far, to
``POST /v1/chat/completions``, and the reply is printed as it streams in (server-sent events).
Lines that start with ``/`` are commands (:data:`_HELP`). Only the standard library and msgspec:
one blocking ``http.client`` connection per reply, whose closing is what cancels the reply on
the server.

- Ctrl-C while a reply streams stops it: the connection is closed (the server frees the slot)
  and the part received so far (what was printed) stays in the history, so the conversation
  goes on from what the user saw; if nothing had arrived yet, the whole exchange is dropped.
- Ctrl-C at the prompt discards the line typed; a second Ctrl-C in a row exits, as in Node's
  REPL. Ctrl-D (end of input) and ``/exit`` exit too, all with code 0.
- A failed request (the server unreachable, an error answer) is printed and leaves the history
  as it was, so that the message can be sent again. Only at the start does an unreachable server
  end the program (exit code 1): then the URL or the key is most likely wrong.
- With standard input not a terminal (``echo hi | llamabox chat``) there is no banner and no
  prompt, and the first failed request ends the program with exit code 1.
"""

from __future__ import annotations

import argparse
import http.client
import math
import os
import signal
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal, TextIO
from urllib.parse import urlsplit

import msgspec

__all__ = ["DEFAULT_URL", "ChatError", "ChatMessage", "ChatRequest", "Conversation", "main"]

DEFAULT_URL = "http://127.0.0.1:8080"
URL_ENV = "LLAMABOX_URL"
API_KEY_ENV = "LLAMA_API_KEY"  # the variable `llamabox serve --api-key` reads
CONNECT_TIMEOUT = 10.0  # seconds
READ_TIMEOUT = 600.0  # seconds without a byte: a long prompt on a busy CPU takes a while
PROMPT = "> "

Role = Literal["system", "user", "assistant"]


class ChatMessage(msgspec.Struct):
    role: Role
    content: str


class ChatRequest(msgspec.Struct, kw_only=True, omit_defaults=True):
    messages: list[ChatMessage]
    model: str | None = None
    stream: bool = False
    temperature: float | None = None
    max_tokens: int | None = None


class _ErrorInfo(msgspec.Struct):
    message: str = ""


class _ErrorBody(msgspec.Struct):
    error: _ErrorInfo | str


class _Delta(msgspec.Struct):
    content: str | None = None


class _ChunkChoice(msgspec.Struct):
    delta: _Delta | None = None
    finish_reason: str | None = None


class _Chunk(msgspec.Struct):
    """One event of a stream: a chunk, or the error event that ends a stream which failed."""

    choices: list[_ChunkChoice] = []
    error: _ErrorInfo | str | None = None


class _Message(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    message: _Message
    finish_reason: str | None = None


class _Completion(msgspec.Struct):
    choices: list[_Choice] = []


class _Model(msgspec.Struct):
    id: str


class _ModelList(msgspec.Struct):
    data: list[_Model] = []


_encode = msgspec.json.Encoder().encode
_chunk = msgspec.json.Decoder(_Chunk)
_completion = msgspec.json.Decoder(_Completion)
_error_body = msgspec.json.Decoder(_ErrorBody)
_model_list = msgspec.json.Decoder(_ModelList)


class ChatError(Exception):
    """A request failed: the server could not be reached, or it answered with an error."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status  # the HTTP status of an error answer


def _error_text(error: _ErrorInfo | str) -> str:
    return error if isinstance(error, str) else error.message


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(getattr(exc, "strerror", None) or str(exc) or type(exc).__name__)


def _sse_data(lines: Iterable[bytes]) -> Iterator[bytes]:
    """The data of each server-sent event: its ``data:`` lines, joined."""
    data: list[bytes] = []
    for raw in lines:
        line = raw.rstrip(b"\r\n")
        if not line:
            if data:
                yield b"\n".join(data)
                data = []
        elif line.startswith(b"data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(b" ") else value)
        # event:, id:, retry: and comments carry nothing the chat API uses
    if data:
        yield b"\n".join(data)


class Reply:
    """A reply as it arrives: iterating yields its text pieces; closing it ends the request.

    A context manager: leaving it (also by Ctrl-C) closes the connection, which cancels the
    request on the server. :attr:`finish_reason` is set once the reply is complete.
    """

    def __init__(
        self, conn: http.client.HTTPConnection, response: http.client.HTTPResponse, stream: bool
    ) -> None:
        self._conn = conn
        self._response = response
        self._stream = stream
        self.finish_reason: str | None = None

    def __enter__(self) -> Reply:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._conn.close()

    def __iter__(self) -> Iterator[str]:
        try:
            yield from self._events() if self._stream else self._whole()
        except (OSError, http.client.HTTPException) as e:
            raise ChatError(f"the connection broke during the reply: {_reason(e)}") from None
        except msgspec.DecodeError as e:
            raise ChatError(f"the server sent something that is not a chat reply: {e}") from None

    def _events(self) -> Iterator[str]:
        for data in _sse_data(iter(self._response.readline, b"")):
            if data == b"[DONE]":
                return
            chunk = _chunk.decode(data)
            if chunk.error is not None:
                raise ChatError(_error_text(chunk.error))
            for choice in chunk.choices[:1]:
                if choice.delta is not None and choice.delta.content:
                    yield choice.delta.content
                if choice.finish_reason is not None:
                    self.finish_reason = choice.finish_reason
        if self.finish_reason is None:  # neither [DONE] nor a finish: the server went away
            raise ChatError("the reply stream ended before the reply was complete")

    def _whole(self) -> Iterator[str]:
        completion = _completion.decode(self._response.read())
        if not completion.choices:
            raise ChatError("the server's answer has no choices")
        choice = completion.choices[0]
        self.finish_reason = choice.finish_reason or "stop"
        if choice.message.content:
            yield choice.message.content


@dataclass(frozen=True)
class Server:
    """Where requests go: the URL of the server (``/v1`` at its end is optional) and a key."""

    url: str
    api_key: str | None = None

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"expected an http:// or https:// URL, got {self.url!r}")
        try:
            parts.port  # noqa: B018 (parsing the port raises for a bad one)
        except ValueError:
            raise ValueError(f"bad port in {self.url!r}") from None

    def _path(self, endpoint: str) -> str:
        base = urlsplit(self.url).path.rstrip("/")
        return (base if base.endswith("/v1") else base + "/v1") + endpoint

    def _headers(self, body: bytes | None) -> dict[str, str]:
        headers = {"Accept": "application/json, text/event-stream"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def _request(
        self, method: str, endpoint: str, body: bytes | None = None
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """The connection and its response, whose status is 200; raises :class:`ChatError`."""
        parts = urlsplit(self.url)
        kind = (
            http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        )
        conn = kind(parts.hostname or "", parts.port, timeout=CONNECT_TIMEOUT)
        try:
            conn.connect()
            if conn.sock is not None:
                conn.sock.settimeout(READ_TIMEOUT)
            conn.request(method, self._path(endpoint), body, self._headers(body))
            response = conn.getresponse()
            if response.status != 200:
                raise ChatError(_http_error(response), response.status)
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise ChatError(f"cannot reach the server at {self.url}: {_reason(e)}") from None
        except BaseException:  # ChatError, Ctrl-C
            conn.close()
            raise
        return conn, response

    def model_name(self) -> str | None:
        """The first model that ``GET /v1/models`` lists; raises :class:`ChatError`."""
        conn, response = self._request("GET", "/models")
        try:
            models = _model_list.decode(response.read())
        except (OSError, http.client.HTTPException, msgspec.DecodeError):
            return None
        finally:
            conn.close()
        return models.data[0].id if models.data else None

    def reply(self, request: ChatRequest) -> Reply:
        conn, response = self._request("POST", "/chat/completions", _encode(request))
        return Reply(conn, response, request.stream)


def _http_error(response: http.client.HTTPResponse) -> str:
    """An error answer as one line: OpenAI's ``error.message``, else the body's start."""
    body = response.read(64 * 1024)
    try:
        message = _error_text(_error_body.decode(body).error)
    except msgspec.DecodeError:
        message = " ".join(body.decode("utf-8", "replace").split())[:200]
    return f"server error {response.status}: {message or response.reason}"


@dataclass
class Conversation:
    """The system prompt and the exchanges so far; a request sends all of them."""

    system: str | None = None
    history: list[ChatMessage] = field(default_factory=list)

    def messages_with(self, text: str) -> list[ChatMessage]:
        head = [ChatMessage("system", self.system)] if self.system else []
        return [*head, *self.history, ChatMessage("user", text)]

    def add_exchange(self, text: str, reply: str) -> None:
        self.history += [ChatMessage("user", text), ChatMessage("assistant", reply)]

    def reset(self) -> None:
        self.history.clear()


@dataclass(frozen=True)
class ChatOptions:
    server: Server
    model: str | None
    system: str | None
    temperature: float | None
    max_tokens: int | None
    stream: bool


_HELP = """\
commands:
  /system TEXT  set the system prompt (it replaces the old one; the history stays)
  /system       show the system prompt
  /reset        clear the history (the system prompt stays)
  /help         show this help
  /exit         leave (also /quit, Ctrl-D, or Ctrl-C twice at the prompt)
Ctrl-C while a reply streams stops it; the part shown stays in the history.
A line that starts with // is sent as a message starting with /.
"""


class ChatSession:
    """The read-send-print loop over one :class:`Conversation`."""

    def __init__(
        self, options: ChatOptions, out: TextIO, err: TextIO, *, interactive: bool
    ) -> None:
        self.options = options
        self.conversation = Conversation(system=options.system or None)
        self.out = out
        self.err = err
        self.interactive = interactive

    def run(self) -> int:
        """Read lines until ``/exit`` or the end of input; returns the exit code."""
        armed = False  # the last thing at the prompt was a Ctrl-C
        while True:
            try:
                line = input(PROMPT if self.interactive else "")
            except EOFError:
                if self.interactive:
                    self.out.write("\n")
                return 0
            except KeyboardInterrupt:
                if not self.interactive:
                    return 130
                if armed:
                    self.out.write("\n")
                    return 0
                self.out.write("\n(Ctrl-C again, Ctrl-D or /exit to leave)\n")
                armed = True
                continue
            armed = False
            if line.startswith("/") and not line.startswith("//"):
                if not self._command(line):
                    return 0
            elif line.strip():
                if not self._send(line[1:] if line.startswith("//") else line):
                    if not self.interactive:
                        return 1

    def _say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def _note(self, text: str) -> None:
        """A remark about the chat: on stderr unless at a terminal, so stdout holds replies."""
        stream = self.out if self.interactive else self.err
        stream.write(f"[{text}]\n")
        stream.flush()

    def _command(self, line: str) -> bool:
        """Run one command; False when it is the one that leaves."""
        name, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        if name in ("/exit", "/quit"):
            return False
        if name == "/help":
            self.out.write(_HELP)
        elif name == "/reset":
            self.conversation.reset()
            self._note("history cleared; the system prompt stays")
        elif name == "/system" and arg:
            self.conversation.system = arg
            self._note("system prompt set")
        elif name == "/system":
            system = self.conversation.system
            self._say(f"system prompt: {system}" if system else "no system prompt")
        else:
            self._note(f"unknown command {name}: /help lists the commands")
        return True

    def _send(self, text: str) -> bool:
        """Send ``text`` with the history and print the reply; False when the request failed."""
        options = self.options
        request = ChatRequest(
            messages=self.conversation.messages_with(text),
            model=options.model,
            stream=options.stream,
            temperature=options.temperature,
            max_tokens=options.max_tokens,
        )
        parts: list[str] = []
        try:
            with options.server.reply(request) as reply:
                for piece in reply:
                    parts.append(piece)
                    self.out.write(piece)
                    self.out.flush()
        except ChatError as e:
            self._end_line(parts)
            self.err.write(f"error: {e}\n")
            self.err.flush()
            return False
        except KeyboardInterrupt:
            if not self.interactive:
                raise
            self._end_line(parts)
            if parts:
                self.conversation.add_exchange(text, "".join(parts))
                self._note("interrupted")
            else:
                self._note("interrupted before the reply began; the message is not kept")
            return True
        self._end_line(parts)
        if reply.finish_reason == "length":
            self._note("the reply reached the token limit")
        self.conversation.add_exchange(text, "".join(parts))
        return True

    def _end_line(self, parts: Sequence[str]) -> None:
        if parts and not parts[-1].endswith("\n"):
            self.out.write("\n")
        self.out.flush()


class _UsageError(Exception):
    pass


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llamabox chat",
        description="Chat in the terminal with a llamabox server (any OpenAI-compatible "
        "server works): replies stream in, the conversation is kept, and lines starting "
        "with / are commands (/help lists them).",
    )
    add = parser.add_argument
    add(
        "--url",
        metavar="URL",
        help=f"the server's URL, with or without /v1 at its end (env {URL_ENV}; default "
        f"{DEFAULT_URL})",
    )
    add(
        "--api-key",
        metavar="KEY",
        help=f"API key sent as 'Authorization: Bearer KEY' (env {API_KEY_ENV}, the server's "
        "variable; the first of a comma-separated list)",
    )
    add("--model", metavar="NAME", help="model name sent with each request (default: none)")
    add("--system", metavar="TEXT", help="system prompt (/system changes it)")
    add("--temperature", metavar="T", type=float, help="sampling temperature (server's default)")
    add("--max-tokens", metavar="N", type=int, help="most tokens per reply (server's default)")
    add("--no-stream", action="store_true", help="wait for each reply whole instead of streaming")
    return parser


def _options(argv: Sequence[str], environ: Mapping[str, str]) -> ChatOptions:
    args = _parser().parse_args(list(argv))
    url = args.url or environ.get(URL_ENV, "").strip() or DEFAULT_URL
    keys = args.api_key if args.api_key is not None else environ.get(API_KEY_ENV, "")
    api_key = next((k.strip() for k in keys.split(",") if k.strip()), None)
    if args.temperature is not None and not (
        math.isfinite(args.temperature) and args.temperature >= 0
    ):
        raise _UsageError(f"--temperature: expected a number >= 0, got {args.temperature:g}")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise _UsageError(f"--max-tokens: expected an integer >= 1, got {args.max_tokens}")
    try:
        server = Server(url.strip(), api_key)
    except ValueError as e:
        raise _UsageError(f"--url: {e}") from None
    return ChatOptions(
        server=server,
        model=args.model,
        system=args.system,
        temperature=args.temperature,
        max_tokens=args.max_tokens,
        stream=not args.no_stream,
    )


def main(argv: list[str]) -> int:
    """``llamabox chat ARGV``; returns the exit code."""
    try:
        options = _options(argv, os.environ)
    except SystemExit as e:  # argparse: --help, or its own usage error
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 2
    except _UsageError as e:
        print(f"llamabox chat: error: {e}", file=sys.stderr)
        return 2
    interactive = sys.stdin.isatty()
    try:
        model = options.server.model_name()
    except ChatError as e:
        if e.status != 503:  # 503: the model is still loading, which is no reason to stop
            print(f"llamabox chat: error: {e}", file=sys.stderr)
            if e.status is None:
                print(
                    "start one with 'llamabox serve', or give its URL with --url", file=sys.stderr
                )
            return 1
        model = None
    except KeyboardInterrupt:
        return 130
    if interactive:
        # Ctrl-C is how a reply is stopped: take it even when started with SIGINT ignored (a
        # shell's background job, nohup), where Python would leave it ignored.
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            import readline  # noqa: F401 (line editing and history for input())
        except ImportError:
            pass
        shown = f" (model {options.model or model})" if options.model or model else ""
        print(f"llamabox chat: {options.server.url}{shown}")
        print("/help for the commands; /exit or Ctrl-D to leave")
    try:
        return ChatSession(options, sys.stdout, sys.stderr, interactive=interactive).run()
    except KeyboardInterrupt:  # not at a terminal, or a second Ctrl-C while handling one
        return 130
