"""Several models behind one endpoint, over fake engines: routing by name, loading on first use,
LRU eviction past --models-max, idle unloads (--models-ttl, keep_alive), /models/load|unload."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tests.unit.fake_engine import FakeEngine, client, make_app, reply

from llamabox.api.app import LlamaboxApp, create_app
from llamabox.api.ollama import keep_alive_seconds
from llamabox.config import ModelConfig, ServerConfig
from llamabox.types import EngineConfig, InvalidRequestError

pytestmark = pytest.mark.unit

MESSAGES = [{"role": "user", "content": "Hi"}]


def router(
    names: tuple[str, ...] = ("a", "b", "c"), **server: Any
) -> tuple[LlamaboxApp, dict[str, FakeEngine]]:
    """An app serving ``names`` (the first the default), each a fake engine not loaded yet."""
    engines: dict[str, FakeEngine] = {}

    def factory(config: EngineConfig) -> FakeEngine:
        engine = engines[Path(config.model).stem] = FakeEngine(config)
        return engine

    models = [
        ModelConfig(
            name=n,
            aliases=[f"{n}-alias"],
            engine=EngineConfig(model=f"/models/{n}-file.gguf", n_parallel=2),
        )
        for n in names
    ]
    config = ServerConfig(engine=models[0].engine, alias=names[0], models=models, **server)
    app = create_app(config, factory(models[0].engine), factory)
    app.startup()
    return app, {n: engines[f"{n}-file"] for n in names}


async def until(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.002)


def states(body: dict[str, Any]) -> dict[str, str]:
    return {card["id"]: card["status"]["value"] for card in body["data"]}


def _states(app: LlamaboxApp) -> dict[str, str]:
    return {e.name: e.status for e in app.state.models.entries}


async def chat(c: Any, model: str | None, **extra: Any) -> Any:
    body: dict[str, Any] = {"messages": MESSAGES, **extra}
    if model is not None:
        body["model"] = model
    return await c.post("/v1/chat/completions", json=body)


async def test_the_request_model_picks_the_engine_and_loads_it_on_first_use() -> None:
    app, engines = router()
    async with client(app) as c:
        assert states((await c.get("/v1/models")).json()) == dict.fromkeys("abc", "unloaded")
        assert (await c.get("/health")).json() == {"status": "ok"}  # none loaded: still up
        assert not any(e.loaded for e in engines.values())
        r = await chat(c, "b")
        assert r.status_code == 200 and r.json()["model"] == "b"
        assert engines["b"].loaded and len(engines["b"].calls) == 1
        assert not engines["a"].loaded and not engines["c"].loaded
        # every name of a model picks it: alias, file name, stem, path, :latest; none: default
        for name in ("c-alias", "c-file.gguf", "c-file", "/models/c-file.gguf", "c:latest"):
            assert (await chat(c, name)).json()["model"] == "c", name
        assert (await chat(c, None)).json()["model"] == "a"
        r = await c.post("/v1/completions", json={"model": "b", "prompt": "x"})
        assert r.json()["model"] == "b"
        r = await c.post("/completion", json={"model": "c", "prompt": "x"})
        assert r.json()["model"] == "c"
        r = await c.post("/api/generate", json={"model": "b", "prompt": "x", "stream": False})
        assert r.json()["model"] == "b"
        r = await c.post("/v1/messages", json={"model": "c", "max_tokens": 4, "messages": MESSAGES})
        assert r.json()["model"] == "c"
        r = await c.post("/v1/responses", json={"model": "b", "input": "x"})
        assert r.json()["model"] == "b"
        r = await c.post("/tokenize", json={"model": "c", "content": "x"})
        assert r.status_code == 200
        assert [len(engines[n].calls) for n in "abc"] == [1, 4, 7]
        body = (await c.get("/v1/models")).json()
        assert states(body) == dict.fromkeys("abc", "loaded")
        card = body["data"][1]
        assert card["aliases"] == ["b-alias"] and card["meta"]["n_vocab"] == 65536
        assert (await c.get("/v1/models/b-alias")).json()["id"] == "b"
        assert (await c.get("/api/tags")).json()["models"][2]["name"] == "c"
    await app.shutdown()
    assert all(e.stopped for e in engines.values())


async def test_an_unknown_model_is_a_404_in_each_shape() -> None:
    app, engines = router()
    async with client(app) as c:
        r = await chat(c, "gpt-4")
        assert r.status_code == 404
        assert r.json()["error"] == {
            "message": "The model 'gpt-4' does not exist", "type": "not_found_error",
            "param": "model", "code": "model_not_found",
        }  # fmt: skip
        r = await c.post("/api/chat", json={"model": "llama3", "messages": MESSAGES})
        assert r.status_code == 404 and r.json() == {"error": "The model 'llama3' does not exist"}
        assert (await c.get("/v1/models/gpt-4")).status_code == 404
        assert (
            await c.post("/v1/embeddings", json={"model": "x", "input": "y"})
        ).status_code == 404
    assert not any(e.loaded for e in engines.values())
    await app.shutdown()


async def test_one_model_keeps_taking_any_name() -> None:
    app, engine = make_app(alias="only")
    async with client(app) as c:
        assert (await chat(c, "gpt-4")).json()["model"] == "only"  # as before
        assert (await c.get("/v1/models/gpt-4")).status_code == 404
        card = (await c.get("/v1/models")).json()["data"][0]
        assert card["status"] == {"value": "loaded"}
        r = await c.post("/models/unload", json={"model": "only"})
        assert r.status_code == 400 and "only one" in r.json()["error"]["message"]
        r = await c.post("/models/load", json={"model": "only"})
        assert r.status_code == 400 and "already loaded" in r.json()["error"]["message"]
        assert (await c.post("/models/load", json={"model": "gpt-4"})).status_code == 404
        r = await c.post("/api/generate", json={"model": "only", "keep_alive": 0})
        assert r.json()["done_reason"] == "unload"
        assert engine.loaded  # pinned: the one model stays
    await app.shutdown()


async def test_past_models_max_the_least_recently_used_idle_model_is_unloaded() -> None:
    app, engines = router(models_max=2)
    async with client(app) as c:
        await chat(c, "a")
        await chat(c, "b")
        await chat(c, "a")  # b is now the least recently used
        await chat(c, "c")
        assert engines["a"].loaded and engines["c"].loaded
        assert not engines["b"].loaded and engines["b"].stopped
        await chat(c, "b")
        assert not engines["a"].loaded  # a was used before c
        assert states((await c.get("/models")).json()) == {
            "a": "unloaded", "b": "loaded", "c": "loaded",
        }  # fmt: skip
    await app.shutdown()


async def test_a_model_in_use_is_never_unloaded_a_load_waits_for_it() -> None:
    app, engines = router(models_max=1)
    engines["a"].outputs = reply("x" * 40)
    engines["a"].token_delay = 0.005
    async with client(app) as c:
        assert (await chat(c, "a")).status_code == 200  # loaded
        long = asyncio.create_task(chat(c, "a", stream=True))
        await until(lambda: bool(engines["a"].active))
        second = asyncio.create_task(chat(c, "b"))
        await until(lambda: _states(app)["b"] == "loading")
        await asyncio.sleep(0.05)
        assert engines["a"].loaded and not engines["b"].loaded  # b waits for a's stream
        r = await long
        assert r.status_code == 200 and r.text.count('"content":"x"') == 40  # whole
        r = await second
        assert r.status_code == 200 and r.json()["model"] == "b"
        assert not engines["a"].loaded and engines["b"].loaded
        assert not [s for s in engines["a"].streams if s.cancelled]
    await app.shutdown()


async def test_idle_models_unload_after_the_ttl_and_a_request_resets_it() -> None:
    app, engines = router(models_ttl=0.15)
    async with client(app) as c:
        await chat(c, "a")
        await chat(c, "b")
        await asyncio.sleep(0.1)
        await chat(c, "b")  # b's idle time starts again
        await until(lambda: not engines["a"].loaded, timeout=1)
        assert engines["b"].loaded
        await until(lambda: not engines["b"].loaded, timeout=1)
        assert (await chat(c, "a")).status_code == 200  # loads again
        assert engines["a"].loaded
    await app.shutdown()


async def test_a_model_own_ttl_wins_and_get_requests_do_not_keep_it_loaded() -> None:
    app, engines = router(models_ttl=0.1)
    app.state.models.entries[1].ttl = None  # b: never (its own setting)
    async with client(app) as c:
        await chat(c, "a")
        await chat(c, "b")
        started = asyncio.get_running_loop().time()
        while engines["a"].loaded:  # reading the default model's props is no use of it
            assert asyncio.get_running_loop().time() - started < 1, "props kept it loaded"
            assert (await c.get("/props")).status_code == 200
            await asyncio.sleep(0.02)
        assert engines["b"].loaded
    await app.shutdown()


async def test_a_load_failure_answers_that_request_and_the_others_go_on() -> None:
    app, engines = router()
    engines["b"].load_error = "not a GGUF file"
    async with client(app) as c:
        assert (await chat(c, "a")).status_code == 200
        r = await chat(c, "b")
        assert r.status_code == 500
        assert r.json()["error"] == {
            "message": "The model 'b' failed to load: not a GGUF file", "type": "server_error",
            "param": None, "code": "model_load_failed",
        }  # fmt: skip
        r = await c.post("/api/generate", json={"model": "b", "prompt": "x"})
        assert r.status_code == 500 and "not a GGUF file" in r.json()["error"]
        card = (await c.get("/v1/models")).json()["data"][1]
        assert card["status"] == {"value": "unloaded", "failed": True, "error": "not a GGUF file"}
        assert (await chat(c, "a")).status_code == 200
        assert (await c.get("/health")).status_code == 200
        engines["b"].load_error = None  # fixed: the next request loads it
        assert (await chat(c, "b")).status_code == 200
        card = (await c.get("/v1/models")).json()["data"][1]
        assert card["status"]["value"] == "loaded" and "failed" not in card["status"]
    await app.shutdown()


async def test_requests_wait_for_a_load_in_progress() -> None:
    app, engines = router()
    engines["c"].load_delay = 0.1
    async with client(app) as c:
        calls = [asyncio.create_task(chat(c, "c")) for _ in range(3)]
        await until(lambda: _states(app)["c"] == "loading")
        assert (await c.get("/health")).status_code == 200
        body = (await c.get("/v1/models")).json()
        assert states(body)["c"] == "loading"
        card = next(card for card in body["data"] if card["id"] == "c")
        assert card["status"]["progress"] == 0.5  # the engine's load_progress, while it loads
        assert [r.status_code for r in await asyncio.gather(*calls)] == [200] * 3
        body = (await c.get("/v1/models")).json()
        assert "progress" not in next(d for d in body["data"] if d["id"] == "c")["status"]
        assert len(engines["c"].calls) == 3
    await app.shutdown()


async def test_models_load_and_unload() -> None:
    app, engines = router()
    engines["b"].outputs = reply("y" * 20)
    engines["b"].token_delay = 0.005
    async with client(app) as c:
        r = await c.post("/models/load", json={"model": "b"})
        assert r.status_code == 200 and r.json() == {"success": True}
        await until(lambda: engines["b"].loaded)
        r = await c.post("/models/load", json={"model": "b"})
        assert r.status_code == 400 and "already loaded" in r.json()["error"]["message"]
        assert (await c.post("/models/unload", json={"model": "b"})).json() == {"success": True}
        assert not engines["b"].loaded
        r = await c.post("/models/unload", json={"model": "b"})
        assert r.status_code == 400 and "not loaded" in r.json()["error"]["message"]
        # in use: unloaded once its request is over, never under it
        stream = asyncio.create_task(chat(c, "b", stream=True))
        await until(lambda: bool(engines["b"].active))
        assert (await c.post("/models/unload", json={"model": "b"})).status_code == 200
        assert engines["b"].loaded
        assert (await stream).text.count('"content":"y"') == 20
        await until(lambda: not engines["b"].loaded)
        for body in ({"model": "nope"}, {}, {"model": ""}, {"model": 5}, []):
            r = await c.post("/models/load", json=body)
            assert r.status_code in (400, 404), body
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert (await c.post("/models/unload", content=b"{oops")).status_code == 400
    await app.shutdown()


async def test_load_on_startup() -> None:
    engines: dict[str, FakeEngine] = {}

    def factory(config: EngineConfig) -> FakeEngine:
        engine = engines[Path(config.model).stem] = FakeEngine(config)
        return engine

    models = [
        ModelConfig(name=n, engine=EngineConfig(model=f"/m/{n}.gguf"), load_on_startup=n == "b")
        for n in "ab"
    ]
    config = ServerConfig(engine=models[0].engine, models=models)
    app = create_app(config, factory(models[0].engine), factory)
    app.startup()
    await until(lambda: engines["b"].loaded)
    assert not engines["a"].loaded
    await app.shutdown()


async def test_ollama_keep_alive_sets_the_idle_time() -> None:
    app, engines = router(models_ttl=60)
    async with client(app) as c:
        gen = {"model": "b", "prompt": "x", "stream": False}
        r = await c.post("/api/generate", json={**gen, "keep_alive": 0})
        assert r.status_code == 200 and r.json()["response"] == "Hello world!"
        await until(lambda: not engines["b"].loaded)  # unloaded right after
        r = await c.post(
            "/api/chat", json={"model": "c", "messages": MESSAGES, "keep_alive": "50ms"}
        )
        assert r.status_code == 200
        await until(lambda: not engines["c"].loaded, timeout=1)
        await c.post("/api/generate", json={**gen, "model": "a", "keep_alive": -1})
        [running] = (await c.get("/api/ps")).json()["models"]
        assert running["name"] == "a" and running["expires_at"].startswith("2")
        # a request without keep_alive: back to --models-ttl
        await chat(c, "a")
        assert app.state.models.entries[0].idle_ttl == 60
        # empty prompt: load; with keep_alive 0: unload
        r = await c.post("/api/generate", json={"model": "b"})
        assert r.json()["done_reason"] == "load" and engines["b"].loaded
        r = await c.post("/api/generate", json={"model": "b", "keep_alive": "0s"})
        assert r.json()["done_reason"] == "unload"
        await until(lambda: not engines["b"].loaded)
        r = await c.post("/api/chat", json={"model": "c", "messages": [], "keep_alive": 0})
        assert r.json()["done_reason"] == "unload" and not engines["c"].loaded
        assert r.json()["message"] == {"content": "", "role": "assistant"}
        r = await c.post("/api/generate", json={**gen, "keep_alive": "soon"})
        assert r.status_code == 400 and "keep_alive" in r.json()["error"]
        assert (await c.post("/api/generate", json={**gen, "keep_alive": [1]})).status_code == 400
    await app.shutdown()


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(None, None), (0, 0.0), (300, 300.0), (-1, -1.0), ("5m", 300.0), ("1h30m", 5400.0),
     ("300ms", 0.3), ("-1", -1.0), ("-5m", -300.0), ("10", 10.0), (" 2s ", 2.0),
     ("1.5h", 5400.0)],
)  # fmt: skip
def test_keep_alive_durations(value: Any, seconds: float | None) -> None:
    assert keep_alive_seconds(value) == seconds


@pytest.mark.parametrize("value", ["soon", "m", "", "5 m", "1x", "--1s", "5m3"])
def test_bad_keep_alive(value: str) -> None:
    with pytest.raises(InvalidRequestError) as e:
        keep_alive_seconds(value)
    assert e.value.param == "keep_alive"


async def test_monitoring_routes_never_load_a_model() -> None:
    app, engines = router(metrics=True)
    async with client(app) as c:
        r = await c.get("/metrics")
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_loaded"
        assert (await c.get("/slots?model=b")).status_code == 503
        assert not any(e.loaded for e in engines.values())
        assert (await c.get("/slots?model=b&autoload=true")).status_code == 200
        assert engines["b"].loaded
        assert (await c.get("/metrics?model=b")).status_code == 200
        assert (await c.get("/props?model=c")).json()["model_alias"] == "c"  # props loads
        body = json.loads((await c.get("/props")).text)
        assert body["model_alias"] == "a"
    await app.shutdown()
