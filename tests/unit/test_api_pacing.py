"""-tps and X-Request-Tokens-Per-Second: outputs delivered at a bounded rate (fake engine).

The bounds asserted are lower bounds on when each output may arrive, which pacing's own sleeps
guarantee whatever the machine's speed; nothing here asserts how fast anything is.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from tests.unit.fake_engine import FakeEngine, client, make_app, reply

from llamabox.api.pacing import PacedStream
from llamabox.cli import parse_serve_args
from llamabox.types import GenerationOutput

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
TEXT = "abcdefghij"  # 10 tokens


async def _arrivals(app: Any, headers: dict[str, str] | None = None) -> list[float]:
    """Seconds from the first streamed token to each later one, as the app sends them (httpx's
    ASGI transport would hand the whole body over at once)."""
    raw = json.dumps({**CHAT, "stream": True}).encode()
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json")]
        + [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
    }
    sent = asyncio.Event()
    times: list[float] = []

    async def receive() -> dict[str, Any]:
        if not sent.is_set():
            sent.set()
            return {"type": "http.request", "body": raw, "more_body": False}
        await asyncio.Event().wait()  # the client stays
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            assert message["status"] == 200
        body = message.get("body", b"")
        for event in body.decode().split("\n\n"):
            if event.startswith("data: {"):
                choices = json.loads(event[6:])["choices"]
                if choices and choices[0]["delta"].get("content"):
                    times.append(time.monotonic())

    await app(scope, receive, send)
    return [t - times[0] for t in times]


def _paced_at(arrivals: list[float], rate: float) -> bool:
    # token k (from 0) may come no earlier than k / rate after the first
    return all(t >= k / rate - 0.005 for k, t in enumerate(arrivals))


async def test_the_server_limit_paces_every_token_after_the_first() -> None:
    app, _ = make_app(FakeEngine(outputs=reply(TEXT)), tokens_per_second=40)
    arrivals = await _arrivals(app)
    assert len(arrivals) == len(TEXT)
    assert _paced_at(arrivals, 40)
    assert arrivals[-1] >= (len(TEXT) - 1) / 40 - 0.005


async def test_the_header_asks_for_less_never_more() -> None:
    app, _ = make_app(FakeEngine(outputs=reply(TEXT)), tokens_per_second=1000)
    assert _paced_at(await _arrivals(app, {"X-Request-Tokens-Per-Second": "25"}), 25)
    app, _ = make_app(FakeEngine(outputs=reply(TEXT)), tokens_per_second=25)
    assert _paced_at(await _arrivals(app, {"X-Request-Tokens-Per-Second": "10000"}), 25)


async def test_minus_one_honours_the_header_alone_and_zero_ignores_it() -> None:
    app, _ = make_app(FakeEngine(outputs=reply(TEXT)), tokens_per_second=-1)
    assert _paced_at(await _arrivals(app, {"X-Request-Tokens-Per-Second": "30"}), 30)
    for limit in (-1, 0):  # no header (-1), or a header that is ignored (0): not paced
        app, engine = make_app(FakeEngine(outputs=reply(TEXT)), tokens_per_second=limit)
        headers = {"X-Request-Tokens-Per-Second": "1"} if limit == 0 else None
        arrivals = await _arrivals(app, headers)
        assert len(arrivals) == len(TEXT)
        assert not engine.active


async def test_a_whole_answer_waits_for_its_last_token_too() -> None:
    app, _ = make_app(FakeEngine(outputs=reply(TEXT)), tokens_per_second=50)
    async with client(app) as c:
        started = time.monotonic()
        r = await c.post("/v1/completions", json={"model": "m", "prompt": "x"})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == TEXT
        assert time.monotonic() - started >= (len(TEXT) - 1) / 50 - 0.005


@pytest.mark.parametrize("value", ["0", "-3", "fast", "nan", "inf", ""])
async def test_a_bad_header_is_a_400_naming_it(value: str) -> None:
    app, engine = make_app(tokens_per_second=10)
    async with client(app) as c:
        r = await c.post(
            "/v1/chat/completions", json=CHAT, headers={"X-Request-Tokens-Per-Second": value}
        )
        assert r.status_code == 400
        error = r.json()["error"]
        assert error["param"] == "X-Request-Tokens-Per-Second"
        assert "X-Request-Tokens-Per-Second" in error["message"]
    assert not engine.calls


async def test_every_api_is_paced() -> None:
    for path, body in (
        ("/completion", {"prompt": "x", "stream": True}),
        ("/api/generate", {"model": "m", "prompt": "x", "stream": True}),
        ("/v1/completions", {"model": "m", "prompt": "x", "stream": True}),
    ):
        app, _ = make_app(FakeEngine(outputs=reply(TEXT)), tokens_per_second=40)
        async with client(app) as c:
            started = time.monotonic()
            r = await c.post(path, json=body)
            assert r.status_code == 200, (path, r.text)
            assert time.monotonic() - started >= (len(TEXT) - 1) / 40 - 0.005, path


async def test_a_client_that_leaves_cancels_the_paced_request() -> None:
    """200 tokens at 20 a second would take 10 s: the client leaves after the first, and the
    request ends at once, engine stream included."""
    engine = FakeEngine(outputs=reply("x" * 200))
    app, _ = make_app(engine, tokens_per_second=20)
    raw = json.dumps({**CHAT, "stream": True}).encode()
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions",
             "query_string": b"", "headers": [(b"content-type", b"application/json")]}  # fmt: skip
    first, gone = asyncio.Event(), asyncio.Event()
    requested = False

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if b'"content":"x"' in message.get("body", b""):
            first.set()

    task = asyncio.create_task(app(scope, receive, send))
    await asyncio.wait_for(first.wait(), 5)
    gone.set()
    await asyncio.wait_for(task, 5)
    assert not engine.active
    assert all(s.cancelled or s.finished for s in engine.streams)


async def test_an_engine_error_comes_through_in_its_turn() -> None:
    class Failing:
        def __init__(self) -> None:
            self.items: list[GenerationOutput | BaseException] = [
                GenerationOutput(text="a", token_ids=[1]),
                RuntimeError("decode failed"),
            ]
            self.cancelled = False

        def __aiter__(self) -> Failing:
            return self

        async def __anext__(self) -> GenerationOutput:
            if not self.items:
                raise StopAsyncIteration
            item = self.items.pop(0)
            if isinstance(item, BaseException):
                raise item
            return item

        def cancel(self) -> None:
            self.cancelled = True

        def keep_outputs(self) -> None:
            pass

    paced = PacedStream(Failing(), 100.0)
    assert (await paced.__anext__()).text == "a"
    with pytest.raises(RuntimeError, match="decode failed"):
        await paced.__anext__()


def test_the_flag_and_its_variable() -> None:
    assert parse_serve_args(["-m", "x", "-tps", "12"], {}).tokens_per_second == 12
    assert (
        parse_serve_args(["-m", "x"], {"LLAMA_ARG_TOKENS_PER_SECOND": "-1"}).tokens_per_second == -1
    )
    assert parse_serve_args(["-m", "x"], {}).tokens_per_second == 0
