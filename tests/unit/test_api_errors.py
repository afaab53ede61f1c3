"""Errors, limits, auth, CORS and request ids on the wire, over the replaying fake engine."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
from tests.unit.fake_engine import (
    FakeEngine,
    client,
    failing,
    make_app,
    ndjson,
    reply,
    sse_events,
    tok,
)

from llamabox.types import (
    ContextLengthError,
    EmbeddingResult,
    EngineConfig,
    EngineStoppedError,
    GenerationError,
    InvalidRequestError,
    QueueFullError,
)

pytestmark = pytest.mark.unit

CHAT = {"messages": [{"role": "user", "content": "Hi"}]}


def _error(body: dict[str, object]) -> dict[str, object]:
    error = body["error"]
    assert isinstance(error, dict)
    assert set(error) == {"message", "type", "param", "code"}
    return error


async def test_malformed_json_is_400() -> None:
    app, _ = make_app()
    async with client(app) as c:
        for content in (b"{", b"", b"[1, 2]"):
            r = await c.post("/v1/chat/completions", content=content)
            assert r.status_code == 400, content
            assert _error(r.json())["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": []}, "messages"),
        ({}, "messages"),
        ({**CHAT, "temperature": 3}, "temperature"),
        ({**CHAT, "temperature": "hot"}, "temperature"),
        ({**CHAT, "top_p": -0.1}, "top_p"),
        ({**CHAT, "n": 0}, "n"),
        ({**CHAT, "stop": 5}, "stop"),
        ({**CHAT, "stop": ["s"] * 17}, "stop"),
        ({**CHAT, "max_tokens": 0}, "max_tokens"),
        ({**CHAT, "max_tokens": -2}, "max_tokens"),
        ({**CHAT, "max_completion_tokens": 0}, "max_completion_tokens"),
        ({**CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({**CHAT, "seed": 2**64}, "seed"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"content": "x"}]}, "messages[0].role"),
        (
            {"messages": [{"role": "user", "content": [{"type": "audio"}]}]},
            "messages[0].content[0].type",
        ),
        ({**CHAT, "response_format": {"type": "yaml"}}, "response_format.type"),
    ],
)
async def test_wrong_field_names_param(body: dict[str, object], param: str) -> None:
    app, engine = make_app()
    async with client(app) as c:
        r = await c.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert _error(r.json())["param"] == param
    assert not engine.calls  # refused before the engine is asked


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/completion", {"prompt": "x", "n_predict": 0}, "n_predict"),
        ("/completion", {"prompt": "x", "n_probs": 101}, "n_probs"),
        ("/v1/completions", {"prompt": "x", "logprobs": 21}, "logprobs"),
        ("/v1/completions", {"prompt": [[1], []]}, "prompt"),
        ("/v1/completions", {"prompt": []}, "prompt"),
        ("/v1/completions", {"prompt": [1, 2], "suffix": "x"}, "suffix"),
    ],
)
async def test_wrong_fields_of_other_routes_name_their_param(
    path: str, body: dict[str, object], param: str
) -> None:
    app, engine = make_app()
    async with client(app) as c:
        r = await c.post(path, json=body)
    assert r.status_code == 400, r.text
    assert _error(r.json())["param"] == param
    assert not engine.calls


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"prompt": "x", "options": {"num_predict": 0}}, "num_predict"),
        ({"prompt": "x", "options": {"top_p": 2}}, "top_p"),
        ({"prompt": "x", "options": {"stop": ["s"] * 17}}, "stop"),
    ],
)
async def test_ollama_out_of_range_options_are_400_in_its_shape(
    body: dict[str, object], needle: str
) -> None:
    app, engine = make_app()
    async with client(app) as c:
        r = await c.post("/api/generate", json={**body, "stream": False})
    assert r.status_code == 400
    assert set(r.json()) == {"error"} and needle in r.json()["error"]
    assert not engine.calls


async def test_n_above_slots_is_400() -> None:
    app, engine = make_app()  # 4 slots
    async with client(app) as c:
        r = await c.post("/v1/chat/completions", json={**CHAT, "n": 5})
    assert r.status_code == 400
    error = _error(r.json())
    assert error["param"] == "n" and "4" in str(error["message"])
    assert not engine.calls


async def test_context_length_error_maps_to_400_context_length_exceeded() -> None:
    app, engine = make_app()
    async with client(app) as c:
        engine.fail_next("generate_choices", ContextLengthError(41, 16))
        r = await c.post("/v1/completions", json={"prompt": "x" * 40})
        assert r.status_code == 400
        error = _error(r.json())
        assert error == {
            "message": "prompt has 41 tokens, context per slot is 16",
            "type": "invalid_request_error",
            "param": "prompt",
            "code": "context_length_exceeded",
        }
        engine.fail_next("generate_choices", ContextLengthError(41, 16))
        r = await c.post("/api/generate", json={"prompt": "x", "raw": True, "stream": True})
        assert r.status_code == 400  # raised before anything streams: a plain error answer
        assert r.json() == {"error": "prompt has 41 tokens, context per slot is 16"}


@pytest.mark.parametrize(
    ("error", "status", "kind", "code"),
    [
        (InvalidRequestError("token 99999 is not in the vocabulary", "prompt"), 400,
         "invalid_request_error", 400),
        (QueueFullError("queue full"), 503, "unavailable_error", 503),
        (EngineStoppedError("the engine is not running"), 503, "unavailable_error", 503),
        (GenerationError("decode failed"), 500, "server_error", 500),
        (RuntimeError("boom"), 500, "server_error", 500),
    ],
)  # fmt: skip
async def test_engine_errors_at_submit_map_to_status_and_type(
    error: BaseException, status: int, kind: str, code: int
) -> None:
    app, engine = make_app()
    async with client(app) as c:
        for path, body in (
            ("/v1/chat/completions", {**CHAT, "stream": True}),
            ("/v1/completions", {"prompt": "x"}),
            ("/completion", {"prompt": "x", "stream": True}),
        ):
            engine.fail_next("generate_choices", error)
            r = await c.post(path, json=body)
            assert r.status_code == status, (path, r.text)
            detail = _error(r.json())
            assert (detail["type"], detail["code"]) == (kind, code)
            if isinstance(error, RuntimeError):  # not one of ours: no internals on the wire
                assert detail["message"] == "Internal server error"
            else:
                assert detail["message"] == str(error)
            if status == 503:
                assert r.headers["retry-after"] == "1"
            else:
                assert "retry-after" not in r.headers
        engine.fail_next("generate_choices", error)
        r = await c.post("/api/chat", json={"messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == status and set(r.json()) == {"error"}
    assert not engine.active


async def test_image_parts_are_refused() -> None:
    app, _ = make_app()
    part = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}
    async with client(app) as c:
        r = await c.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": [part]}]}
        )
    assert r.status_code == 400
    assert _error(r.json())["param"] == "messages[0].content[0]"


async def test_unknown_route_404_and_wrong_method_405() -> None:
    app, _ = make_app()
    async with client(app) as c:
        r = await c.get("/v2/nothing")
        assert r.status_code == 404 and _error(r.json())["type"] == "not_found_error"
        r = await c.get("/v1/chat/completions")
        assert r.status_code == 405
        assert r.headers["allow"] == "POST"
        r = await c.post("/health")
        assert r.status_code == 405 and r.headers["allow"] == "GET"


async def test_body_over_limit_is_413() -> None:
    app, engine = make_app(max_body_bytes=100)
    async with client(app) as c:
        big = {"messages": [{"role": "user", "content": "x" * 200}]}
        r = await c.post("/v1/chat/completions", json=big)
        assert r.status_code == 413
        _error(r.json())

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted while reading
            for _ in range(3):
                yield b"x" * 60

        r = await c.post("/v1/chat/completions", content=chunks())
        assert r.status_code == 413
    assert not engine.calls


async def test_queue_full_is_503_with_retry_after_then_served() -> None:
    app, engine = make_app()
    async with client(app) as c:
        engine.fail_next("generate_choices", QueueFullError(""))
        r = await c.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 503
        assert r.headers["retry-after"] == "1"
        error = _error(r.json())
        assert error["type"] == "unavailable_error" and error["code"] == 503
        assert "every slot is taken" in str(error["message"])  # our words for an empty message
        r = await c.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 200


async def test_prompts_submit_all_or_none() -> None:
    """Each prompt is one engine call of n choices; when a later one is refused, the streams of
    those already submitted are cancelled."""
    app, engine = make_app()
    engine.fail_next("generate_choices", QueueFullError("queue full"), after=1)
    async with client(app) as c:
        r = await c.post("/v1/completions", json={"prompt": ["a", "b", "c"], "n": 2})
    assert r.status_code == 503
    [call] = engine.calls  # "b" was refused, "c" never submitted
    assert (call.request.prompt, call.n) == ("a", 2)
    assert len(engine.streams) == 2 and all(s.cancelled for s in engine.streams)
    assert not engine.active


async def test_mid_stream_failure_is_an_error_event() -> None:
    app, engine = make_app()
    engine.outputs = failing("Hel", GenerationError("decode failed"))
    async with client(app) as c:
        for path, body in (
            ("/v1/chat/completions", {**CHAT, "stream": True}),
            ("/v1/completions", {"prompt": "x", "stream": True}),
            ("/completion", {"prompt": "x", "stream": True}),
        ):
            r = await c.post(path, json=body)
            assert r.status_code == 200
            events = sse_events(r.text)
            assert "[DONE]" not in events  # the stream did not complete
            assert len(events) >= 2  # what came before the failure was sent
            error = _error(json.loads(events[-1]))
            assert error == {
                "message": "decode failed", "type": "server_error", "param": None, "code": 500,
            }  # fmt: skip
        r = await c.post("/v1/chat/completions", json=CHAT)  # not streaming: a plain 500
        assert r.status_code == 500
        assert _error(r.json())["message"] == "decode failed"
        r = await c.post("/api/generate", json={"prompt": "x"})
        lines = ndjson(r.text)
        assert "".join(str(line.get("response", "")) for line in lines[:-1]) == "Hel"
        assert lines[-1] == {"error": "decode failed"}
        r = await c.post("/api/chat", json={"messages": CHAT["messages"], "stream": False})
        assert r.status_code == 500 and r.json() == {"error": "decode failed"}
    assert not engine.active


async def test_one_failing_choice_of_n_fails_the_response_and_cancels_the_others() -> None:
    app, engine = make_app()
    engine.token_delay = 0.001
    long = reply("x" * 200)
    async with client(app) as c:
        engine.next_outputs = [long, failing("ab", GenerationError("decode failed")), long]
        r = await c.post("/v1/chat/completions", json={**CHAT, "n": 3, "stream": True})
        events = sse_events(r.text)
        assert "[DONE]" not in events
        assert _error(json.loads(events[-1]))["message"] == "decode failed"
        engine.next_outputs = [long, failing("ab", GenerationError("decode failed")), long]
        r = await c.post("/v1/completions", json={"prompt": "x", "n": 3})
        assert r.status_code == 500 and _error(r.json())["message"] == "decode failed"
    assert len(engine.streams) == 6
    survivors = [s for i, s in enumerate(engine.streams) if i % 3 != 1]
    assert all(s.cancelled and s.n_read < 100 for s in survivors)
    assert not engine.active


async def test_invalid_request_found_mid_stream_is_an_invalid_request_event() -> None:
    app, engine = make_app()
    engine.outputs = failing("ab", InvalidRequestError("no token can be sampled"))
    async with client(app) as c:
        r = await c.post("/v1/completions", json={"prompt": "x", "stream": True})
    error = _error(json.loads(sse_events(r.text)[-1]))
    assert (error["type"], error["code"]) == ("invalid_request_error", 400)


async def test_api_keys() -> None:
    app, _ = make_app(api_keys=["k1", "k2"])
    async with client(app) as c:
        assert (await c.get("/health")).status_code == 200  # exempt
        r = await c.get("/v1/models")
        assert r.status_code == 401
        assert _error(r.json())["type"] == "authentication_error"
        r = await c.get("/v1/models", headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401
        r = await c.get("/v1/models", headers={"Authorization": "Basic k1"})
        assert r.status_code == 401
        assert (
            await c.get("/v1/models", headers={"Authorization": "Bearer k2"})
        ).status_code == 200
        assert (await c.get("/v1/models", headers={"X-Api-Key": "k1"})).status_code == 200
        r = await c.get("/v1/models", headers={"X-Api-Key": "k1x"})
        assert r.status_code == 401
        assert _error(r.json())["code"] == "invalid_api_key"
        r = await c.post("/api/chat", json={"messages": []})
        assert r.status_code == 401 and r.json() == {"error": "Invalid API Key"}
        r = await c.post("/v1/completions", json={"prompt": "x"})
        assert r.status_code == 401
    assert not app.state.engine.calls  # type: ignore[attr-defined]


async def test_request_id_echoed_or_generated() -> None:
    app, _ = make_app()
    async with client(app) as c:
        r = await c.get("/health", headers={"X-Request-ID": "abc-123"})
        assert r.headers["x-request-id"] == "abc-123"
        r1 = await c.get("/health")
        r2 = await c.get("/nowhere")
        assert r1.headers["x-request-id"] != r2.headers["x-request-id"]
        assert len(r1.headers["x-request-id"]) >= 16
        r = await c.get("/health", headers={"X-Request-ID": "bad id\twith spaces"})
        assert r.headers["x-request-id"] != "bad id\twith spaces"


async def test_request_id_goes_to_the_engine_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    app, engine = make_app()
    caplog.set_level("INFO", logger="llamabox.http")
    async with client(app) as c:
        r = await c.post("/v1/chat/completions", json=CHAT, headers={"X-Request-ID": "req-42"})
        assert r.headers["x-request-id"] == "req-42"
        r = await c.post("/completion", json={"prompt": "x"})
    assert engine.requests[0].request_id == "req-42"
    assert engine.requests[1].request_id == r.headers["x-request-id"]  # the generated one
    from llamabox.logs import request_id_var

    assert request_id_var.get() is None
    assert any("/v1/chat/completions 200" in rec.getMessage() for rec in caplog.records)


async def test_cors_off_by_default() -> None:
    app, _ = make_app()
    async with client(app) as c:
        r = await c.get("/health", headers={"Origin": "http://x.example"})
        assert "access-control-allow-origin" not in r.headers
        r = await c.options("/v1/chat/completions", headers={"Origin": "http://x.example"})
        assert r.status_code == 204
        assert "access-control-allow-origin" not in r.headers
        assert "POST" in r.headers["allow"]


async def test_cors_allowed_origins_and_preflight() -> None:
    app, _ = make_app(cors_origins=["http://ok.example"])
    async with client(app) as c:
        r = await c.get("/health", headers={"Origin": "http://ok.example"})
        assert r.headers["access-control-allow-origin"] == "http://ok.example"
        r = await c.get("/health", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in r.headers
        r = await c.options(
            "/v1/chat/completions",
            headers={"Origin": "http://ok.example", "Access-Control-Request-Method": "POST"},
        )
        assert r.status_code == 204
        assert "POST" in r.headers["access-control-allow-methods"]
        assert "authorization" in r.headers["access-control-allow-headers"]
        assert (await c.options("/nowhere")).status_code == 404
    app, _ = make_app(cors_origins=["*"], api_keys=["k"])
    async with client(app) as c:  # preflight needs no key
        r = await c.options("/v1/models", headers={"Origin": "http://any.example"})
        assert r.status_code == 204
        assert r.headers["access-control-allow-origin"] == "http://any.example"
        # Error answers carry them too, so that a page can read them (and their Retry-After).
        r = await c.get("/v1/models", headers={"Origin": "http://any.example"})
        assert r.status_code == 401
        assert r.headers["access-control-allow-origin"] == "http://any.example"
        assert "retry-after" in r.headers["access-control-expose-headers"]
        assert r.headers["vary"] == "Origin"


async def test_health_while_loading_then_ok() -> None:
    engine = FakeEngine(load_delay=0.05)
    app, _ = make_app(engine, loaded=False)
    app.startup()
    async with client(app) as c:
        r = await c.get("/health")
        assert r.status_code == 503
        assert r.json()["error"] == {
            "code": 503, "message": "Loading model", "type": "unavailable_error", "param": None,
        }  # fmt: skip
        r = await c.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        r = await c.post("/api/generate", json={"prompt": "x"})
        assert r.status_code == 503 and r.json() == {"error": "Loading model"}
        assert (await c.get("/api/version")).status_code == 200  # needs no model
        assert app.load_task is not None
        await app.load_task
        r = await c.get("/health")
        assert r.status_code == 200 and r.json() == {"status": "ok"}
    await app.shutdown()
    assert engine.stopped
    assert not engine.calls


async def test_models_answer_503_with_retry_after_while_loading_then_200() -> None:
    """A listed model is one a client may use: not before it is loaded."""
    engine = FakeEngine(load_delay=0.05)
    app, _ = make_app(engine, loaded=False, alias="m")
    app.startup()
    async with client(app) as c:
        for path in ("/v1/models", "/models", "/v1/models/m", "/models/m"):
            r = await c.get(path)
            assert r.status_code == 503, path
            assert r.headers["retry-after"] == "1"
            assert _error(r.json()) == {
                "message": "Loading model", "type": "unavailable_error", "param": None,
                "code": 503,
            }  # fmt: skip
        assert app.load_task is not None
        await app.load_task
        r = await c.get("/v1/models")
        assert r.status_code == 200 and "retry-after" not in r.headers
        assert [card["id"] for card in r.json()["data"]] == ["m"]
        r = await c.get("/v1/models/m")
        assert r.status_code == 200 and r.json()["id"] == "m"
        assert (await c.get("/v1/models/other")).status_code == 404
    await app.shutdown()


async def test_load_failure_reported() -> None:
    engine = FakeEngine(load_error="not a GGUF file")
    app, _ = make_app(engine, loaded=False)
    failures: list[BaseException] = []
    app.on_fatal = failures.append
    app.startup()
    assert app.load_task is not None
    await app.load_task
    assert len(failures) == 1
    async with client(app) as c:
        r = await c.get("/health")
        assert r.status_code == 500 and "not a GGUF file" in r.text
        assert (await c.post("/v1/completions", json={"prompt": "x"})).status_code == 500
        r = await c.get("/v1/models")
        assert r.status_code == 500 and "retry-after" not in r.headers
    await app.shutdown()


async def test_bad_bytes_and_deep_json_are_400_in_each_shape() -> None:
    """msgspec raises UnicodeDecodeError and RecursionError for these, not a DecodeError."""
    app, engine = make_app()
    deep = b'{"prompt": "x", "json_schema": ' + b"[" * 3000 + b"]" * 3000 + b"}"
    async with client(app) as c:
        for path, body, needle in [
            (
                "/v1/chat/completions",
                b'{"messages": [{"role": "user", "content": "\xff"}]}',
                "UTF-8",
            ),
            ("/v1/completions", b'{"prompt": "x", "json_schema": {"\xff": 1}}', "UTF-8"),
            ("/v1/completions", deep, "nested too deeply"),
            ("/api/generate", b'{"prompt": "\xe2\x82"}', "UTF-8"),
        ]:
            r = await c.post(path, content=body)
            assert r.status_code == 400, r.text
            body_json = r.json()
            message = (
                body_json["error"] if path.startswith("/api/") else _error(body_json)["message"]
            )
            assert needle in str(message), message
    assert not engine.calls


async def test_n_choices_are_one_engine_call_with_the_seed_as_given() -> None:
    """The engine derives choice j's seed (seed + j, wrapped); the serving layer passes the
    request's seed, random (-1) included, and n once."""
    app, engine = make_app()
    async with client(app) as c:
        for seed in (2**63 - 1, -1):
            r = await c.post("/v1/chat/completions", json={**CHAT, "n": 3, "seed": seed})
            assert r.status_code == 200, r.text
    assert [(call.request.sampling.seed, call.n) for call in engine.calls] == [
        (2**63 - 1, 3),
        (-1, 3),
    ]


async def test_logit_bias_keys_that_only_look_numeric_are_text() -> None:
    app, engine = make_app()
    async with client(app) as c:
        r = await c.post("/v1/completions", json={"prompt": "x", "logit_bias": {"²": 1, "--5": 2}})
    assert r.status_code == 200, r.text
    [request] = engine.requests
    # the text keys' tokens (the fake's: a token per character) each get their bias
    assert request.sampling.logit_bias == {tok("²")[0]: 1.0, tok("-")[0]: 2.0, tok("5")[0]: 2.0}


async def test_more_prompts_than_slots_and_queue_is_400_not_503() -> None:
    config = EngineConfig(model="/m/x.gguf", n_parallel=2, n_queue_max=3, embeddings=True)
    app, engine = make_app(FakeEngine(config))
    async with client(app) as c:
        r = await c.post("/v1/completions", json={"prompt": ["a"] * 6})
        assert r.status_code == 400 and _error(r.json())["param"] == "prompt"
        r = await c.post("/v1/completions", json={"prompt": ["a"] * 3, "n": 2})
        assert r.status_code == 400
        r = await c.post("/v1/embeddings", json={"input": ["a"] * 6})
        assert r.status_code == 400 and _error(r.json())["param"] == "input"
        r = await c.post("/v1/completions", json={"prompt": ["a"] * 5})
        assert r.status_code == 200, r.text
        assert len(r.json()["choices"]) == 5
    assert [call.n for call in engine.calls] == [1] * 5


async def test_empty_embedding_input_and_unknown_ollama_role_are_400() -> None:
    config = EngineConfig(model="/m/x.gguf", embeddings=True, pooling="mean")
    app, engine = make_app(FakeEngine(config))
    async with client(app) as c:
        for body in ({"input": ""}, {"input": ["ok", ""]}):
            r = await c.post("/v1/embeddings", json=body)
            assert r.status_code == 400 and "empty" in str(_error(r.json())["message"])
        r = await c.post("/api/embed", json={"input": [""]})
        assert r.status_code == 400 and "empty" in r.json()["error"]
        messages = [{"role": "wizard", "content": "x"}]
        r = await c.post("/api/chat", json={"messages": messages, "stream": False})
        assert r.status_code == 400 and "wizard" in r.json()["error"]
    assert not engine.embed_inputs and not engine.calls


async def test_engine_errors_of_embed_tokenize_and_templates_map_to_their_shapes() -> None:
    config = EngineConfig(model="/m/x.gguf", embeddings=True, pooling="mean")
    app, engine = make_app(FakeEngine(config))
    async with client(app) as c:
        engine.fail_next("embed", InvalidRequestError("input 0 is too long", param="input"))
        r = await c.post("/v1/embeddings", json={"input": "x"})
        assert r.status_code == 400 and _error(r.json())["param"] == "input"
        engine.fail_next("embed", QueueFullError("busy"))
        r = await c.post("/api/embed", json={"input": "x"})
        assert r.status_code == 503 and r.json() == {"error": "busy"}
        assert r.headers["retry-after"] == "1"
        engine.fail_next("apply_chat_template", InvalidRequestError("bad template", "messages"))
        r = await c.post("/apply-template", json=CHAT)
        assert r.status_code == 400 and _error(r.json())["param"] == "messages"
        engine.fail_next("apply_chat_template", InvalidRequestError("bad template", "messages"))
        r = await c.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 400 and _error(r.json())["message"] == "bad template"
        engine.fail_next("tokenize", EngineStoppedError("the engine is not running"))
        r = await c.post("/tokenize", json={"content": "x"})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        engine.fail_next("detokenize", InvalidRequestError("token -5 is out of range", "tokens"))
        r = await c.post("/detokenize", json={"tokens": [-5]})
        assert r.status_code == 400 and _error(r.json())["param"] == "tokens"
    assert not engine.calls


async def test_embeddings_of_one_vector_per_token_are_400() -> None:
    config = EngineConfig(model="/m/x.gguf", embeddings=True, pooling="none")
    app, engine = make_app(FakeEngine(config))
    engine.embeddings = [EmbeddingResult([[0.5, 0.5], [1.0, 0.0]], 2)]
    async with client(app) as c:
        r = await c.post("/v1/embeddings", json={"input": "ab"})
        assert r.status_code == 400 and _error(r.json())["param"] == "input"
        assert "pooling" in str(_error(r.json())["message"])
        r = await c.post("/api/embed", json={"input": "ab", "truncate": False})
        assert r.status_code == 400 and "pooling" in r.json()["error"]


async def test_stop_strings_are_passed_on_without_empty_ones() -> None:
    app, engine = make_app()
    async with client(app) as c:
        for body in (
            {**CHAT, "stop": "\n"},
            {**CHAT, "stop": ["a", "", "b"]},
            {**CHAT, "stop": ""},
            {**CHAT, "stop": None},
        ):
            assert (await c.post("/v1/chat/completions", json=body)).status_code == 200
        options = {"stop": ["x", ""]}
        r = await c.post("/api/generate", json={"prompt": "p", "options": options})
        assert r.status_code == 200
    assert [req.stop for req in engine.requests] == [["\n"], ["a", "b"], [], [], ["x"]]
