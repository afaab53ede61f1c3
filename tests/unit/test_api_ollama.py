"""Ollama endpoints on the wire, over the replaying fake engine."""

from __future__ import annotations

import json

import pytest
from tests.unit.fake_engine import (
    BOS,
    FIM_MID,
    FIM_PRE,
    FIM_SUF,
    N_EMBD_TOKENS_MAX,
    FakeEngine,
    client,
    make_app,
    ndjson,
    rendered,
    reply,
    tok,
)

from llamabox.types import EmbeddingResult, EngineConfig, SamplingParams

pytestmark = pytest.mark.unit


async def test_generate_stream_is_ndjson_ending_with_done() -> None:
    app, engine = make_app()
    engine.outputs = reply("Hello world!", prompt_tokens=9)
    async with client(app) as c:
        r = await c.post("/api/generate", json={"model": "m", "prompt": "Why?", "system": "S"})
    assert r.headers["content-type"] == "application/x-ndjson"
    lines = ndjson(r.text)
    assert all(line["done"] is False for line in lines[:-1])
    assert [line["response"] for line in lines] == [*"Hello world!", ""]
    assert all(set(line) == {"model", "created_at", "done", "response"} for line in lines[:-1])
    last = lines[-1]
    assert last["done"] is True and last["done_reason"] == "stop"
    assert (last["eval_count"], last["prompt_eval_count"]) == (12, 9)  # the engine's counts
    assert last["prompt_eval_duration"] == 2_000_000 and last["eval_duration"] == 4_000_000
    assert isinstance(last["total_duration"], int) and last["load_duration"] == 0
    assert str(last["created_at"]).endswith("Z")
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Why?"}]
    assert engine.templated == [messages]
    assert engine.requests[0].prompt == rendered(messages)


async def test_generate_non_stream_raw_and_options() -> None:
    defaults = SamplingParams(top_p=0.5, min_p=0.2)
    app, engine = make_app(sampling=defaults)
    engine.outputs = reply("Hell", "length")
    options = {
        "num_predict": 4,
        "temperature": 0.1,
        "top_k": 3,
        "seed": 5,
        "stop": ["x"],
        "repeat_penalty": 1.2,
        "num_ctx": 99,  # accepted, ignored
        "mirostat": 1,
    }
    async with client(app) as c:
        body = {"prompt": "P", "raw": True, "stream": False, "options": options, "format": "json"}
        r = await c.post("/api/generate", json=body)
    out = r.json()
    assert out["response"] == "Hell" and out["done"] is True and out["done_reason"] == "length"
    assert out["eval_count"] == 4
    [call] = engine.calls
    request = call.request
    assert request.prompt == "P" and call.n == 1 and not engine.templated  # raw: no template
    assert request.max_tokens == 4 and request.stop == ["x"]
    s = request.sampling
    assert (s.temperature, s.top_k, s.seed, s.repeat_penalty) == (0.1, 3, 5, 1.2)
    assert (s.top_p, s.min_p) == (0.5, 0.2)  # the server's defaults where not given
    assert json.loads(request.sampling.json_schema or "") == {"type": "object"}


@pytest.mark.parametrize(("num_predict", "max_tokens"), [(-1, None), (-2, None), (9, 9)])
async def test_num_predict_maps_to_max_tokens(num_predict: int, max_tokens: int | None) -> None:
    app, engine = make_app()
    async with client(app) as c:
        body = {"prompt": "P", "stream": False, "options": {"num_predict": num_predict}}
        assert (await c.post("/api/generate", json=body)).status_code == 200
    assert engine.requests[0].max_tokens == max_tokens


async def test_negative_temperature_is_greedy_and_no_options_are_the_defaults() -> None:
    defaults = SamplingParams(temperature=0.3, top_k=11)
    app, engine = make_app(sampling=defaults)
    async with client(app) as c:
        body = {"prompt": "P", "stream": False, "options": {"temperature": -1}}
        assert (await c.post("/api/generate", json=body)).status_code == 200
        assert (await c.post("/api/generate", json={"prompt": "P"})).status_code == 200
    greedy, default = engine.requests
    assert greedy.sampling.temperature == 0.0 and greedy.sampling.top_k == 11
    assert default.sampling == defaults
    assert default.max_tokens is None and default.stop == []


async def test_generate_suffix_is_a_fim_prompt() -> None:
    app, engine = make_app()
    async with client(app) as c:
        body = {"prompt": "ab", "suffix": "c", "stream": False}
        assert (await c.post("/api/generate", json=body)).status_code == 200
    assert engine.requests[0].prompt == [BOS, FIM_PRE, *tok("ab"), FIM_SUF, *tok("c"), FIM_MID]
    assert not engine.templated


async def test_generate_empty_prompt_loads() -> None:
    app, engine = make_app()
    async with client(app) as c:
        out = (await c.post("/api/generate", json={"model": "m"})).json()
        assert out["done"] is True and out["done_reason"] == "load" and out["response"] == ""
        out = (await c.post("/api/chat", json={"model": "m", "messages": []})).json()
        assert out["done_reason"] == "load" and out["message"]["content"] == ""
    assert not engine.calls


async def test_chat_stream_and_non_stream() -> None:
    app, engine = make_app()
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Yes?"},
        {"role": "tool", "content": "42"},
    ]
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    async with client(app) as c:
        r = await c.post("/api/chat", json={"model": "m", "messages": messages})
        lines = ndjson(r.text)
        assert "".join(str(line["message"]["content"]) for line in lines) == "Hello world!"
        assert lines[0]["message"] == {"role": "assistant", "content": "H"}
        assert lines[-1]["done"] is True and lines[-1]["done_reason"] == "stop"
        assert lines[-1]["message"] == {"role": "assistant", "content": ""}
        body = {"messages": messages, "stream": False, "format": schema}
        out = (await c.post("/api/chat", json=body)).json()
        assert out["message"] == {"role": "assistant", "content": "Hello world!"}
        assert out["done"] is True
    assert engine.templated == [messages, messages]  # roles and contents as given
    assert engine.requests[0].prompt == rendered(messages)
    assert engine.requests[0].sampling.json_schema is None
    assert json.loads(engine.requests[1].sampling.json_schema or "") == schema


async def test_tags_show_version() -> None:
    app, _ = make_app(alias="tiny")
    async with client(app) as c:
        [model] = (await c.get("/api/tags")).json()["models"]
        assert model["name"] == "tiny" and model["size"] == 123_456
        assert model["details"]["format"] == "gguf"
        assert model["details"]["parameter_size"] == "1M"
        assert model["details"]["quantization_level"] == "Q4_K"
        out = (await c.post("/api/show", json={"model": "tiny:latest"})).json()
        assert out["template"] == "{{ fake }}"
        assert out["model_info"]["llama.context_length"] == 2048
        assert out["capabilities"] == ["completion", "insert"]  # no embeddings here
        assert (await c.post("/api/show", json={"name": "tiny"})).status_code == 200
        r = await c.post("/api/show", json={"model": "other"})
        assert r.status_code == 404 and r.json() == {"error": "model 'other' not found"}
        assert "version" in (await c.get("/api/version")).json()


def _embedding_engine() -> FakeEngine:
    config = EngineConfig(model="/m/e.gguf", embeddings=True, pooling="mean", n_parallel=2)
    return FakeEngine(config)


async def test_embed() -> None:
    app, engine = make_app(_embedding_engine())
    engine.embeddings = [EmbeddingResult([3.0, 4.0], 2), EmbeddingResult([0.0, -1.5], 5)]
    async with client(app) as c:
        out = (await c.post("/api/embed", json={"model": "e", "input": ["a", "b"]})).json()
    assert out["embeddings"] == [[3.0, 4.0], [0.0, -1.5]]  # the engine's vectors, as they are
    assert out["prompt_eval_count"] == 7  # summed
    assert out["model"] == "e" and out["load_duration"] == 0
    assert isinstance(out["total_duration"], int)
    assert engine.embed_inputs == [["a", "b"]]


async def test_embed_truncates_only_inputs_longer_than_the_engine_takes() -> None:
    app, engine = make_app(_embedding_engine())
    long = "x" * (N_EMBD_TOKENS_MAX + 10)
    async with client(app) as c:
        assert (await c.post("/api/embed", json={"input": "short"})).status_code == 200
        assert (await c.post("/api/embed", json={"input": ["a", long]})).status_code == 200
        body = {"input": long, "truncate": False}
        assert (await c.post("/api/embed", json=body)).status_code == 200
    short, cut, untouched = engine.embed_inputs
    assert short == ["short"]  # text, tokenized by the engine
    # tokens, each input cut to what the engine takes (the BOS counts)
    assert cut == [[BOS, *tok("a")], [BOS, *tok(long)][:N_EMBD_TOKENS_MAX]]
    assert untouched == [long]  # the engine's to refuse


async def test_embed_empty_input_is_400() -> None:
    app, engine = make_app(_embedding_engine())
    async with client(app) as c:
        for inputs in ([], [""], ["a", ""]):
            body = {"input": inputs}
            r = await c.post("/api/embed", json=body)
            assert r.status_code == 400 and isinstance(r.json()["error"], str)
    assert not engine.embed_inputs


async def test_errors_in_ollama_shape() -> None:
    app, _ = make_app()
    async with client(app) as c:
        r = await c.post("/api/chat", content=b"{not json")
        assert r.status_code == 400 and isinstance(r.json()["error"], str)
        r = await c.post("/api/embed", json={"input": "x"})
        assert r.status_code == 501 and isinstance(r.json()["error"], str)
        r = await c.get("/api/nothing")
        assert r.status_code == 404 and isinstance(r.json()["error"], str)
        r = await c.get("/api/chat")
        assert r.status_code == 405 and r.headers["allow"] == "POST"
        assert isinstance(r.json()["error"], str)
        r = await c.post("/api/generate", json={"prompt": "x", "images": ["aGk="]})
        assert r.status_code == 400 and "multimodal" in r.json()["error"]
