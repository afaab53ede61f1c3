"""Client disconnects, lifespan and graceful shutdown, driving the ASGI app directly."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from tests.unit.fake_engine import FakeEngine, client, make_app, reply

pytestmark = pytest.mark.unit

CHAT = {"messages": [{"role": "user", "content": "Hi"}]}


class Call:
    """One HTTP request through the ASGI interface, with a client that can hang up."""

    def __init__(self, app: Any, path: str, body: dict[str, Any]) -> None:
        self.sent: list[dict[str, Any]] = []
        self.hang_up = asyncio.Event()
        self.first_body = asyncio.Event()
        self._body = json.dumps(body).encode()
        scope = {
            "type": "http",
            "method": "POST",
            "path": path,
            "query_string": b"",
            "headers": [(b"content-type", b"application/json")],
        }
        self.task = asyncio.create_task(app(scope, self._receive, self._send))

    async def _receive(self) -> dict[str, Any]:
        if self._body is not None:
            body, self._body = self._body, None  # type: ignore[assignment]
            return {"type": "http.request", "body": body, "more_body": False}
        await self.hang_up.wait()
        return {"type": "http.disconnect"}

    async def _send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)
        if message["type"] == "http.response.body" and message.get("body"):
            self.first_body.set()

    @property
    def status(self) -> int:
        return int(self.sent[0]["status"])

    @property
    def complete(self) -> bool:
        last = self.sent[-1] if self.sent else {}
        return last.get("type") == "http.response.body" and not last.get("more_body", False)


def _slow_engine(n_chars: int = 200) -> FakeEngine:
    engine = FakeEngine(outputs=reply("x" * n_chars))
    engine.token_delay = 0.01
    return engine


@pytest.mark.parametrize(("stream", "n"), [(True, 1), (False, 1), (True, 3), (False, 3)])
async def test_disconnect_cancels_the_request(stream: bool, n: int) -> None:
    app, engine = make_app(_slow_engine())
    call = Call(app, "/v1/chat/completions", {**CHAT, "stream": stream, "n": n})
    while len(engine.active) < n:
        await asyncio.sleep(0.005)
    request_streams = list(engine.active)
    if stream:
        await asyncio.wait_for(call.first_body.wait(), 2)
    await asyncio.sleep(0.05)  # generating
    call.hang_up.set()
    await asyncio.wait_for(call.task, 2)  # returns quietly
    assert all(s.cancelled for s in request_streams)
    assert all(s.n_read < 100 for s in request_streams)  # stopped early, not read to the end
    assert not engine.active  # the slots are free
    assert engine.stats().n_busy == 0
    assert not app._requests
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert not [t for t in tasks if "_next_or_none" in repr(t)]  # no read left pending


async def test_disconnect_on_ollama_stream() -> None:
    app, engine = make_app(_slow_engine())
    call = Call(app, "/api/chat", {"messages": [{"role": "user", "content": "x"}]})
    await asyncio.wait_for(call.first_body.wait(), 2)
    call.hang_up.set()
    await asyncio.wait_for(call.task, 2)
    [stream] = engine.streams
    assert stream.cancelled
    assert not engine.active


async def test_completed_requests_are_not_cancelled_and_free_their_slots() -> None:
    app, engine = make_app()
    async with client(app) as c:
        for body in (CHAT, {**CHAT, "stream": True}, {**CHAT, "n": 3}):
            assert (await c.post("/v1/chat/completions", json=body)).status_code == 200
    assert len(engine.streams) == 5
    assert all(s.finished and not s.cancelled for s in engine.streams)
    assert engine.stats().n_busy == 0


async def test_shutdown_lets_requests_finish() -> None:
    app, engine = make_app(_slow_engine(20), timeout=5.0)
    app.startup()
    call = Call(app, "/v1/chat/completions", CHAT)
    while not engine.active:
        await asyncio.sleep(0.005)
    await app.shutdown()
    assert call.task.done() and call.complete and call.status == 200
    answer = json.loads(call.sent[1]["body"])
    assert answer["choices"][0]["message"]["content"] == "x" * 20
    assert engine.stopped


async def test_shutdown_cancels_requests_past_the_timeout() -> None:
    app, engine = make_app(_slow_engine(1000), timeout=0.1)
    app.startup()
    call = Call(app, "/v1/chat/completions", {**CHAT, "stream": True})
    await asyncio.wait_for(call.first_body.wait(), 2)
    await asyncio.wait_for(app.shutdown(), 3)
    assert call.task.done() and not call.task.cancelled()
    [stream] = engine.streams
    assert stream.cancelled
    assert not engine.active and engine.stopped


async def test_shutdown_does_not_wait_for_a_body_that_never_comes() -> None:
    """A request whose body never arrives (its client gone unreported) has started nothing:
    shutdown cancels it at once instead of waiting out the timeout."""
    app, engine = make_app(timeout=600.0)
    app.startup()
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/tokenize",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"20")],
    }
    never = asyncio.Event()

    async def receive() -> dict[str, Any]:
        await never.wait()
        return {"type": "http.disconnect"}

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    task = asyncio.create_task(app(scope, receive, send))
    await asyncio.sleep(0.05)
    await asyncio.wait_for(app.shutdown(), 2)
    assert task.done() and not task.cancelled() and not sent
    assert engine.stopped


async def test_closing_refuses_new_generations() -> None:
    app, engine = make_app()
    app.closing = True
    async with client(app) as c:
        r = await c.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["message"] == "Server is shutting down"
        r = await c.post("/api/generate", json={"prompt": "x"})
        assert r.status_code == 503 and r.json() == {"error": "Server is shutting down"}
        assert (await c.get("/health")).status_code == 200
        assert (await c.post("/tokenize", json={"content": "x"})).status_code == 200
    assert not engine.calls


async def test_a_failed_engine_turns_health_503_with_its_reason() -> None:
    app, engine = make_app()
    async with client(app) as c:
        assert (await c.get("/health")).status_code == 200
        engine.fail_reason = "the ggml RPC server (--rpc 10.0.0.2:50052) went away"
        r = await c.get("/health")
        assert r.status_code == 503
        assert r.json()["error"]["message"] == engine.fail_reason
        assert r.json()["error"]["type"] == "unavailable_error"


async def test_lifespan_protocol() -> None:
    engine = FakeEngine(load_delay=0.01)
    app, _ = make_app(engine, loaded=False)
    inbox: asyncio.Queue[dict[str, str]] = asyncio.Queue()
    outbox: list[dict[str, str]] = []

    async def send(message: Any) -> None:
        outbox.append(message)

    task = asyncio.create_task(app({"type": "lifespan"}, inbox.get, send))
    await inbox.put({"type": "lifespan.startup"})
    while not outbox:
        await asyncio.sleep(0.001)
    assert outbox == [{"type": "lifespan.startup.complete"}]
    assert not engine.is_loaded  # startup completes before the model is loaded
    assert app.load_task is not None
    await app.load_task
    assert engine.is_loaded
    await inbox.put({"type": "lifespan.shutdown"})
    await asyncio.wait_for(task, 2)
    assert outbox[-1] == {"type": "lifespan.shutdown.complete"}
    assert engine.stopped
