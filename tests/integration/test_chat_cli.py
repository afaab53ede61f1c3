"""``llamabox chat`` under a pseudo terminal (pexpect), against a real server on the tiny model.

What the client sends is read off the wire by :class:`RecordingProxy`, a pass-through proxy in
front of the real server: it records each request body and relays the real reply (a stream
byte for byte), and hangs up on the server when the client hangs up on it. The tiny model's text
is random, so the tests compare what was sent and shown, never the words.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pexpect
import pytest

from tests.integration.server_fixtures import API_KEY, ServerProcess, free_port

pytestmark = pytest.mark.integration

TIMEOUT = 60  # seconds for any one expectation: generous for a loaded 2-core machine
PROMPT = "> "
# the console script where it is installed (not in scripts/test_lowest.py's environment)
_SCRIPT = shutil.which("llamabox", path=str(Path(sys.executable).parent))
CHAT = [_SCRIPT, "chat"] if _SCRIPT else [sys.executable, "-m", "llamabox", "chat"]
LONG = "900"  # tokens: seconds of streaming on the tiny model, and within a slot's 1024


@dataclass
class Exchange:
    """One request through the proxy and what the server answered."""

    method: str
    path: str
    body: Any
    response: bytearray = field(default_factory=bytearray)
    complete: bool = False  # the whole answer was relayed
    closed: threading.Event = field(default_factory=threading.Event)

    def _choices(self) -> list[dict[str, Any]]:
        """Every choice of the answer: one per event of a stream, else the one of the whole."""
        text = self.response.decode("utf-8", "replace")
        if not text.startswith("data:"):
            return list(json.loads(text)["choices"])
        events = text.split("\n\n")[:-1]  # the last one is empty, or torn by a hang-up
        datas = [e.removeprefix("data: ") for e in events]
        return [c for d in datas if d.startswith("{") for c in json.loads(d)["choices"]]

    def reply_text(self) -> str:
        """The content of the answer: the deltas of a stream, or the message of a whole one."""
        parts = (c.get("delta") or c.get("message") or {} for c in self._choices())
        return "".join(part.get("content") or "" for part in parts)

    def finish_reason(self) -> str | None:
        return next((c["finish_reason"] for c in self._choices() if c["finish_reason"]), None)


class _Relay(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # the answer ends when the connection does: no framing
    server: _ProxyServer

    def do_GET(self) -> None:
        self._relay()

    def do_POST(self) -> None:
        self._relay()

    def _relay(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else None
        exchange = Exchange(self.command, self.path, json.loads(raw) if raw else None)
        self.server.exchanges.append(exchange)
        upstream = http.client.HTTPConnection("127.0.0.1", self.server.upstream_port, timeout=60)
        try:
            names = ("authorization", "content-type", "accept")
            headers = {k: v for k, v in self.headers.items() if k.lower() in names}
            upstream.request(self.command, self.path, raw, headers)
            answer = upstream.getresponse()
            self.send_response(answer.status)
            self.send_header("Content-Type", answer.getheader("Content-Type", "text/plain"))
            self.end_headers()
            while chunk := answer.read1(65536):
                exchange.response += chunk
                self.wfile.write(chunk)
            exchange.complete = True
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client hung up: so do we, which cancels the request on the server
        finally:
            upstream.close()
            exchange.closed.set()

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True
    upstream_port: int
    exchanges: list[Exchange]


class RecordingProxy:
    """A pass-through proxy to ``upstream`` on a port of its own; a context manager."""

    def __init__(self, upstream: ServerProcess) -> None:
        self._server = _ProxyServer(("127.0.0.1", 0), _Relay)
        self._server.upstream_port = upstream.port
        self._server.exchanges = []
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> RecordingProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop listening: from now on the port refuses connections."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(10)
        self._server.server_close()

    @property
    def exchanges(self) -> list[Exchange]:
        return self._server.exchanges

    def chats(self) -> list[Exchange]:
        return [e for e in self.exchanges if e.path.endswith("/chat/completions")]

    def wait_chat(self, n: int, *, closed: bool = True) -> Exchange:
        """The ``n``-th chat request (from 1), once it is over (``closed``) or has arrived."""
        deadline = time.monotonic() + TIMEOUT
        while len(self.chats()) < n:
            assert time.monotonic() < deadline, f"chat request {n} never came"
            time.sleep(0.01)
        exchange = self.chats()[n - 1]
        assert not closed or exchange.closed.wait(TIMEOUT), f"chat request {n} never ended"
        return exchange


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LLAMA_API_KEY", "LLAMABOX_URL")}
    return {**env, "TERM": "dumb", **extra}  # dumb: no escape sequences from readline


@contextlib.contextmanager
def chat(*args: str, **env: str) -> Iterator[pexpect.spawn]:
    """``llamabox chat ARGS`` in a pseudo terminal, waiting at its first prompt."""
    with warnings.catch_warnings():  # Python 3.12+ warns about forkpty() beside threads
        warnings.simplefilter("ignore", DeprecationWarning)
        child = pexpect.spawn(
            CHAT[0],
            [*CHAT[1:], *args],
            env=_env(**env),
            encoding="utf-8",
            codec_errors="replace",
            timeout=TIMEOUT,
            dimensions=(40, 250),
        )
    try:
        child.expect_exact("/help for the commands")
        child.expect_exact(PROMPT)
        yield child
    finally:
        child.close(force=True)


def _expect_reply(child: pexpect.spawn, proxy: RecordingProxy, n: int) -> Exchange:
    """Wait for the ``n``-th reply to be shown whole (the terminal's exact text), then the
    prompt; random text may hold "> " itself, so the prompt alone would not do."""
    exchange = proxy.wait_chat(n)
    assert exchange.complete, f"chat request {n} was cut off"
    if text := exchange.reply_text():
        child.expect_exact(text.replace("\n", "\r\n"))
    if exchange.finish_reason() == "length":
        child.expect_exact("[the reply reached the token limit]")
    child.expect_exact(PROMPT)
    return exchange


def _ctrl_c_at_prompt(child: pexpect.spawn) -> None:
    """Ctrl-C once readline waits for a key: CPython's readline loop sees a SIGINT only while
    it waits in select(), and one that comes while it handles a key waits for the next key."""
    time.sleep(0.2)
    child.sendintr()


def _shown(child: pexpect.spawn) -> str:
    """What the terminal showed before the last match, with the pty's \\r\\n back to \\n."""
    return str(child.before).replace("\r\n", "\n")


def _exit(child: pexpect.spawn) -> int | None:
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    status: int | None = child.exitstatus
    return status


def _slots_idle(server: ServerProcess) -> bool:
    deadline = time.monotonic() + 10
    with server.http() as http:
        while any(s["is_processing"] for s in http.get("/slots").json()):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
    return True


def _user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def test_reply_streams_in_and_the_history_goes_with_the_next_message(
    tiny_server: ServerProcess,
) -> None:
    with RecordingProxy(tiny_server) as proxy:
        flags = ["--url", proxy.url, "--api-key", API_KEY, "--max-tokens", "8"]
        with chat(*flags, "--temperature", "0") as child:
            child.sendline("hello")
            first = _expect_reply(child, proxy, 1)  # the reply as streamed, on the terminal
            reply = first.reply_text()
            assert reply.strip()
            assert first.body == {
                "messages": [_user("hello")],
                "stream": True,
                "temperature": 0.0,
                "max_tokens": 8,
            }

            child.sendline("and then?")
            second = _expect_reply(child, proxy, 2)
            assert second.body["messages"] == [
                _user("hello"),
                {"role": "assistant", "content": reply},
                _user("and then?"),
            ]
            assert _exit(child) == 0
    gets = [e.path for e in proxy.exchanges if e.method == "GET"]
    assert gets == ["/v1/models"]  # the check at the start


def test_system_prompt_and_reset_change_what_is_sent(tiny_server: ServerProcess) -> None:
    with RecordingProxy(tiny_server) as proxy:
        flags = ["--url", f"{proxy.url}/v1", "--api-key", API_KEY, "--max-tokens", "2"]
        with chat(*flags, "--system", "Be brief.") as child:
            child.sendline("/system")
            child.expect_exact("system prompt: Be brief.")
            child.expect_exact(PROMPT)
            child.sendline("one")
            first = _expect_reply(child, proxy, 1)
            system = {"role": "system", "content": "Be brief."}
            assert first.body["messages"] == [system, _user("one")]

            child.sendline("/system Answer in French.")
            child.expect_exact("[system prompt set]")
            child.expect_exact(PROMPT)
            child.sendline("two")
            second = _expect_reply(child, proxy, 2)
            french = {"role": "system", "content": "Answer in French."}
            exchange = [_user("one"), {"role": "assistant", "content": first.reply_text()}]
            assert second.body["messages"] == [french, *exchange, _user("two")]

            child.sendline("/reset")
            child.expect_exact("[history cleared; the system prompt stays]")
            child.expect_exact(PROMPT)
            child.sendline("//three")  # a leading // sends a message that starts with /
            third = _expect_reply(child, proxy, 3)
            assert third.body["messages"] == [french, _user("/three")]
            assert _exit(child) == 0


def test_ctrl_c_stops_a_streaming_reply_and_keeps_the_part_shown(
    tiny_server: ServerProcess,
) -> None:
    with RecordingProxy(tiny_server) as proxy:
        flags = ["--url", proxy.url, "--api-key", API_KEY, "--max-tokens", LONG]
        with chat(*flags) as child:
            child.sendline("Tell me a long story.")
            first = proxy.wait_chat(1, closed=False)
            child.expect_exact("Tell me a long story.")
            child.expect(r"\S")  # the reply's first text, while the stream is still going
            assert not first.complete
            child.sendintr()
            child.expect_exact("[interrupted]")
            assert first.closed.wait(TIMEOUT) and not first.complete
            child.expect_exact(PROMPT)
            assert _slots_idle(tiny_server), "the interrupted reply still holds its slot"

            child.sendline("Go on.")
            second = proxy.wait_chat(2, closed=False)
            kept = second.body["messages"][1]
            assert kept["role"] == "assistant" and kept["content"].strip()
            assert first.reply_text().startswith(kept["content"])  # what had arrived, in order
            child.sendintr()
            child.expect(r"\[interrupted")  # before or after the reply's first text
            child.expect_exact(PROMPT)
            assert _slots_idle(tiny_server)
            assert _exit(child) == 0


def test_ctrl_c_at_the_prompt_clears_the_line_and_twice_exits(
    tiny_server: ServerProcess,
) -> None:
    with chat(LLAMABOX_URL=tiny_server.base_url, LLAMA_API_KEY=API_KEY) as child:  # no flags
        child.send("half a line")
        child.expect_exact("half a line")  # echoed: readline has taken every key
        _ctrl_c_at_prompt(child)
        child.expect_exact("(Ctrl-C again, Ctrl-D or /exit to leave)")
        child.expect_exact(PROMPT)
        child.sendline("/help")  # runs alone: the line typed before was cleared
        # and a line in between means the next Ctrl-C warns again
        child.expect_exact("/reset")
        child.expect_exact(PROMPT)
        _ctrl_c_at_prompt(child)
        child.expect_exact("(Ctrl-C again")
        child.expect_exact(PROMPT)
        _ctrl_c_at_prompt(child)
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0


def test_commands_exit_and_end_of_input(tiny_server: ServerProcess) -> None:
    with chat("--url", tiny_server.base_url, "--api-key", API_KEY) as child:
        child.sendline("/help")
        child.expect_exact("/system TEXT")
        child.expect_exact(PROMPT)
        child.sendline("/nonsense")
        child.expect_exact("[unknown command /nonsense: /help lists the commands]")
        child.expect_exact(PROMPT)
        assert _exit(child) == 0
    with chat("--url", tiny_server.base_url, "--api-key", API_KEY) as child:
        child.sendeof()
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0


def test_an_error_answer_is_shown_and_the_chat_goes_on(tiny_server: ServerProcess) -> None:
    with RecordingProxy(tiny_server) as proxy:
        flags = ["--url", proxy.url, "--api-key", API_KEY, "--max-tokens", "2"]
        with chat(*flags, "--temperature", "5") as child:  # the server allows at most 2
            child.sendline("hello")
            child.expect_exact("error: server error 400: ")
            child.expect_exact(PROMPT)
            assert "temperature" in _shown(child)
            proxy.stop()  # the server goes away
            child.sendline("anyone there?")
            child.expect_exact(f"error: cannot reach the server at {proxy.url}: ")
            child.expect_exact(PROMPT)
            assert _exit(child) == 0


def _run(*args: str, stdin: str = "", **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CHAT, *args], input=stdin, env=_env(**env), capture_output=True, text=True, timeout=120
    )


def test_an_unreachable_server_or_a_wrong_key_ends_it_at_the_start(
    tiny_server: ServerProcess,
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    out = _run("--url", url)
    assert out.returncode == 1 and out.stdout == ""
    assert f"llamabox chat: error: cannot reach the server at {url}: " in out.stderr
    assert "llamabox serve" in out.stderr

    out = _run(LLAMABOX_URL=tiny_server.base_url, LLAMA_API_KEY="wrong")
    assert out.returncode == 1
    assert "server error 401: Invalid API Key" in out.stderr

    assert _run("--url", "localhost:8080").returncode == 2  # no scheme
    assert _run("--max-tokens", "0").returncode == 2


def test_piped_input_prints_only_the_replies(tiny_server: ServerProcess) -> None:
    with RecordingProxy(tiny_server) as proxy:
        flags = ["--url", proxy.url, "--no-stream", "--max-tokens", "4"]
        out = _run(*flags, stdin="hello\n/system terse\nagain\n", LLAMA_API_KEY=API_KEY)
        assert out.returncode == 0, out.stderr
        first, second = proxy.wait_chat(1), proxy.wait_chat(2)
    assert "stream" not in first.body and "stream" not in second.body
    assert second.body["messages"][0] == {"role": "system", "content": "terse"}
    replies = [first.reply_text(), second.reply_text()]
    assert out.stdout == "".join(r if not r or r.endswith("\n") else r + "\n" for r in replies)
    assert "[system prompt set]" in out.stderr

    flags = ["--url", tiny_server.base_url, "--temperature", "5"]
    out = _run(*flags, stdin="hi\nnever sent\n", LLAMA_API_KEY=API_KEY)
    assert out.returncode == 1  # a script learns that its chat failed
    assert out.stderr.count("server error 400") == 1


def test_chat_is_a_command_of_llamabox() -> None:
    out = subprocess.run([*CHAT[:-1], "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "\n  chat " in out.stdout
    out = _run("--help")
    assert out.returncode == 0 and "--max-tokens" in out.stdout and "--no-stream" in out.stdout
