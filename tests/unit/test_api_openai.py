"""OpenAI endpoints on the wire, over the replaying fake engine."""

from __future__ import annotations

import base64
import json
import math
import struct
from typing import Any

import pytest
from tests.unit.fake_engine import (
    BOS,
    FIM_MID,
    FIM_PRE,
    FIM_SUF,
    PROMPT_TOKENS,
    FakeEngine,
    client,
    make_app,
    rendered,
    reply,
    sse_events,
    tok,
)

from llamabox.types import (
    EmbeddingResult,
    EngineConfig,
    GenerationOutput,
    SamplingParams,
    TokenLogprob,
)

pytestmark = pytest.mark.unit

MESSAGES = [{"role": "user", "content": "Hi"}]
CHAT = {"model": "anything", "messages": MESSAGES}


async def test_models_list_and_get() -> None:
    app, _ = make_app(alias="my-model")
    async with client(app) as c:
        for path in ("/v1/models", "/models"):
            body = (await c.get(path)).json()
            assert body["object"] == "list"
            [card] = body["data"]
            assert card["id"] == "my-model" and card["object"] == "model"
            assert card["owned_by"] == "llamabox" and isinstance(card["created"], int)
            assert card["meta"] == {
                "n_vocab": 65536, "n_ctx_train": 2048, "n_embd": 4, "n_params": 1_000_000,
                "size": 123_456,
            }  # fmt: skip
        assert (await c.get("/v1/models/my-model")).json()["id"] == "my-model"
        for name in ("fake-model.gguf", "fake-model", "/models/fake-model.gguf", "my-model:latest"):
            assert (await c.get(f"/v1/models/{name}")).status_code == 200, name
        r = await c.get("/v1/models/gpt-4")
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "model_not_found"
        assert r.json()["error"]["param"] == "model"
        assert "tags" not in body["data"][0]  # none given


async def test_models_list_the_tags() -> None:
    app, _ = make_app(alias="m", tags=["code", "small"])
    async with client(app) as c:
        assert (await c.get("/v1/models")).json()["data"][0]["tags"] == ["code", "small"]


async def test_chat_completion_shape() -> None:
    app, engine = make_app()
    async with client(app) as c:
        r = await c.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200
    body = r.json()
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert body["model"] == "fake-model"  # the alias, whatever the client named
    assert isinstance(body["created"], int) and body["system_fingerprint"]
    [choice] = body["choices"]
    assert choice == {
        "index": 0,
        "message": {"role": "assistant", "content": "Hello world!"},
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert body["usage"] == {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": 12,
        "total_tokens": PROMPT_TOKENS + 12,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    timings = body["timings"]
    assert set(timings) == {
        "cache_n", "prompt_n", "prompt_ms", "prompt_per_token_ms", "prompt_per_second",
        "predicted_n", "predicted_ms", "predicted_per_token_ms", "predicted_per_second",
    }  # fmt: skip
    assert (timings["prompt_n"], timings["predicted_n"], timings["predicted_ms"]) == (7, 12, 4.0)
    assert timings["predicted_per_second"] == 3000.0
    # The rendered template goes to the engine as text; tokenizing it adds the BOS.
    assert engine.templated == [MESSAGES]
    [call] = engine.calls
    assert call.request.prompt == rendered(MESSAGES) and call.n == 1
    assert call.request.add_special and call.request.parse_special
    assert not engine.active


async def test_timings_report_cache_and_drafts() -> None:
    app, engine = make_app()
    engine.outputs = reply("abcd", prompt_tokens=10, cached_tokens=6, drafted=5, accepted=3)
    async with client(app) as c:
        body = (await c.post("/v1/chat/completions", json=CHAT)).json()
    assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 6}
    timings = body["timings"]
    assert (timings["cache_n"], timings["prompt_n"]) == (6, 4)  # evaluated: not cached
    assert (timings["draft_n"], timings["draft_n_accepted"]) == (5, 3)


async def test_finish_reasons_follow_the_engine() -> None:
    app, engine = make_app()
    engine.next_outputs = [
        reply("Hel", "length"),
        reply("Hello ", stop_word="wor"),
        reply("Hi", "cancelled"),
        reply("Hel", "length"),
    ]
    async with client(app) as c:
        results = [(await c.post("/v1/chat/completions", json=CHAT)).json() for _ in range(3)]
        r = await c.post("/v1/completions", json={"prompt": "x", "stream": True})
    choices = [b["choices"][0] for b in results]
    assert [(ch["message"]["content"], ch["finish_reason"]) for ch in choices] == [
        ("Hel", "length"),
        ("Hello ", "stop"),
        ("Hi", "stop"),  # "cancelled" is not an OpenAI finish reason
    ]
    chunks = [json.loads(e) for e in sse_events(r.text)[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def test_chat_stream_framing() -> None:
    app, _ = make_app()
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    async with client(app) as c:
        r = await c.post("/v1/chat/completions", json=body)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["cache-control"] == "no-cache"
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len({c["id"] for c in chunks}) == 1
    assert len({c["created"] for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    first = chunks[0]["choices"][0]
    assert first["delta"] == {"role": "assistant", "content": ""}
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:-1])
    deltas = [c["choices"][0]["delta"].get("content", "") for c in chunks[1:-2]]
    assert deltas == list("Hello world!")  # one event per engine output
    finish = chunks[-2]
    assert finish["choices"][0]["finish_reason"] == "stop"
    assert finish["choices"][0]["delta"] == {}
    assert finish["timings"]["predicted_n"] == 12
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 12
    assert usage_chunk["usage"]["prompt_tokens"] == PROMPT_TOKENS
    assert all("usage" not in c for c in chunks[:-1])


async def test_chat_stream_without_usage_has_no_usage_chunk() -> None:
    app, _ = make_app()
    async with client(app) as c:
        r = await c.post("/v1/chat/completions", json={**CHAT, "stream": True})
    chunks = [json.loads(e) for e in sse_events(r.text)[:-1]]
    assert all(c["choices"] for c in chunks)
    assert all("usage" not in c for c in chunks)


async def test_stream_skips_outputs_without_text() -> None:
    app, engine = make_app()
    outputs = reply("ab")
    outputs.insert(1, GenerationOutput(text="", token_ids=[5]))  # a token that shows no text
    engine.outputs = outputs
    async with client(app) as c:
        r = await c.post("/v1/chat/completions", json={**CHAT, "stream": True})
    chunks = [json.loads(e) for e in sse_events(r.text)[:-1]]
    assert [c["choices"][0]["delta"] for c in chunks] == [
        {"role": "assistant", "content": ""}, {"content": "a"}, {"content": "b"}, {},
    ]  # fmt: skip


async def test_chat_n_choices_merge_and_usage_sums() -> None:
    app, engine = make_app()
    engine.next_outputs = [
        reply("a", prompt_tokens=5, cached_tokens=2),
        reply("bb", "length", prompt_tokens=5, cached_tokens=2),
        reply("ccc", prompt_tokens=5, cached_tokens=2),
    ]
    async with client(app) as c:
        r = await c.post("/v1/chat/completions", json={**CHAT, "n": 3, "seed": 7})
    body = r.json()
    choices = [
        (ch["index"], ch["message"]["content"], ch["finish_reason"]) for ch in body["choices"]
    ]
    assert choices == [(0, "a", "stop"), (1, "bb", "length"), (2, "ccc", "stop")]
    [call] = engine.calls  # one prompt, n choices: one engine call
    assert call.n == 3 and call.request.sampling.seed == 7
    assert len(engine.templated) == 1  # rendered once
    # The prompt (and its cached part) counts once; completions add up.
    assert body["usage"] == {
        "prompt_tokens": 5,
        "completion_tokens": 6,
        "total_tokens": 11,
        "prompt_tokens_details": {"cached_tokens": 2},
    }
    assert body["timings"]["predicted_n"] == 1  # the first choice's


async def test_chat_stream_n_choices() -> None:
    app, engine = make_app()
    engine.token_delay = 0.001
    engine.next_outputs = [reply("first"), reply("second!", "length")]
    body = {**CHAT, "n": 2, "stream": True, "stream_options": {"include_usage": True}}
    async with client(app) as c:
        r = await c.post("/v1/chat/completions", json=body)
    chunks = [json.loads(e) for e in sse_events(r.text)[:-1]]
    assert [c["choices"][0]["delta"] for c in chunks[:2]] == [
        {"role": "assistant", "content": ""}
    ] * 2  # every choice opens with its role
    assert [c["choices"][0]["index"] for c in chunks[:2]] == [0, 1]
    texts = {0: "", 1: ""}
    finishes = {}
    indexes = []
    for chunk in chunks[:-1]:
        [choice] = chunk["choices"]
        indexes.append(choice["index"])
        texts[choice["index"]] += choice["delta"].get("content", "")
        if choice["finish_reason"]:
            finishes[choice["index"]] = choice["finish_reason"]
            assert "timings" in chunk
    assert texts == {0: "first", 1: "second!"}
    assert finishes == {0: "stop", 1: "length"}
    assert indexes[2:4] == [0, 1]  # interleaved as the outputs come, not one after the other
    usage = chunks[-1]["usage"]
    assert usage["completion_tokens"] == 12 and usage["prompt_tokens"] == PROMPT_TOKENS


async def test_sampling_maps_request_over_server_defaults() -> None:
    defaults = SamplingParams(temperature=0.3, top_k=11, min_p=0.2, grammar='root ::= "d"')
    app, engine = make_app(sampling=defaults)
    body = {
        **CHAT,
        "temperature": 0.9,
        "top_p": 0.5,
        "presence_penalty": 0.1,
        "frequency_penalty": -0.2,
        "seed": 3,
        "max_completion_tokens": 5,
        "max_tokens": 9,
        "stop": "\n",
        "top_k": 4,
        "typical_p": 0.7,
        "repeat_penalty": 1.1,
        "repeat_last_n": 32,
        "ignore_eos": True,
        "cache_prompt": False,
        "user": "someone",
        "response_format": {"type": "json_object"},
    }
    async with client(app) as c:
        assert (await c.post("/v1/chat/completions", json=body)).status_code == 200
        assert (await c.post("/v1/chat/completions", json=CHAT)).status_code == 200
        assert (
            await c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 9})
        ).status_code == 200
        r = await c.post("/v1/chat/completions", json={**CHAT, "max_tokens": -1})
        assert r.status_code == 200
    given, default, max_tokens, unlimited = engine.requests
    s = given.sampling
    assert (s.temperature, s.top_p, s.top_k, s.min_p) == (0.9, 0.5, 4, 0.2)
    assert (s.presence_penalty, s.frequency_penalty, s.seed) == (0.1, -0.2, 3)
    assert (s.typical_p, s.repeat_penalty, s.repeat_last_n, s.ignore_eos) == (0.7, 1.1, 32, True)
    # the request's constraint replaces the server's default one, whatever kind either is
    assert (s.grammar, json.loads(s.json_schema or "")) == (None, {"type": "object"})
    assert not s.logprobs and s.n_probs == 0
    assert given.max_tokens == 5  # max_completion_tokens wins
    assert given.stop == ["\n"]
    assert given.cache_prompt is False
    assert default.sampling == defaults
    assert default.max_tokens is None and default.stop == [] and default.cache_prompt
    assert max_tokens.max_tokens == 9
    assert unlimited.max_tokens is None  # -1: the server's default


async def test_response_format_and_grammar() -> None:
    app, engine = make_app()
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    async with client(app) as c:
        for fmt in (
            {"type": "json_object"},
            {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
            {"type": "text"},
            {"type": "json_object", "schema": schema},
        ):
            r = await c.post("/v1/chat/completions", json={**CHAT, "response_format": fmt})
            assert r.status_code == 200, r.text
        r = await c.post("/completion", json={"prompt": "x", "json_schema": schema})
        assert r.status_code == 200
        r = await c.post("/completion", json={"prompt": "x", "json_schema": json.dumps(schema)})
        assert r.status_code == 200
        r = await c.post("/completion", json={"prompt": "x", "grammar": 'root ::= "a"'})
        assert r.status_code == 200
        r = await c.post(
            "/completion", json={"prompt": "x", "grammar": 'root ::= "a"', "json_schema": {}}
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == "grammar"
        r = await c.post("/completion", json={"prompt": "x", "json_schema": [1]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "json_schema"
        fmt = {"type": "json_schema", "json_schema": {"name": "x"}}
        r = await c.post("/v1/chat/completions", json={**CHAT, "response_format": fmt})
        assert r.status_code == 400
    any_object, with_schema, text, object_schema, native, native_text, grammar = engine.requests
    assert json.loads(any_object.sampling.json_schema or "") == {"type": "object"}
    assert json.loads(with_schema.sampling.json_schema or "") == schema
    assert text.sampling.json_schema is None and text.sampling.grammar is None
    assert json.loads(object_schema.sampling.json_schema or "") == schema
    assert json.loads(native.sampling.json_schema or "") == schema
    assert json.loads(native_text.sampling.json_schema or "") == schema  # a string holding one
    assert grammar.sampling.grammar == 'root ::= "a"' and grammar.sampling.json_schema is None


async def test_logit_bias_keys_become_token_ids() -> None:
    app, engine = make_app()
    async with client(app) as c:
        body: dict[str, Any] = {**CHAT, "logit_bias": {"42": -100, "7": 5, "99999999": 1}}
        assert (await c.post("/v1/chat/completions", json=body)).status_code == 200
        body = {"prompt": "x", "logit_bias": [[42, False], ["ab", 2.0], [9, True]]}
        assert (await c.post("/completion", json=body)).status_code == 200
    # ids outside the vocabulary are the engine's to refuse: passed on as they are
    assert engine.requests[0].sampling.logit_bias == {42: -100.0, 7: 5.0, 99999999: 1.0}
    native = engine.requests[1].sampling.logit_bias
    assert native == {42: -math.inf, tok("a")[0]: 2.0, tok("b")[0]: 2.0}  # true: left alone


async def test_chat_logprobs_shape() -> None:
    app, engine = make_app()
    engine.outputs = reply("Hi!", n_top=2)
    async with client(app) as c:
        body = {**CHAT, "logprobs": True, "top_logprobs": 2}
        r = await c.post("/v1/chat/completions", json=body)
        stream = await c.post("/v1/chat/completions", json={**body, "stream": True})
        plain = await c.post("/v1/chat/completions", json={**CHAT, "logprobs": True})
    assert engine.requests[0].sampling.logprobs and engine.requests[0].sampling.n_probs == 2
    assert engine.requests[2].sampling.logprobs and engine.requests[2].sampling.n_probs == 0
    logprobs = r.json()["choices"][0]["logprobs"]
    assert logprobs["refusal"] is None
    content = logprobs["content"]
    assert [entry["token"] for entry in content] == ["H", "i", "!"]
    assert content[0] == {
        "token": "H",
        "logprob": -0.5,
        "bytes": [ord("H")],
        "top_logprobs": [
            {"token": "a", "logprob": -1.0, "bytes": [97]},
            {"token": "b", "logprob": -2.0, "bytes": [98]},
        ],
    }
    chunks = [json.loads(e) for e in sse_events(stream.text)[:-1]]
    tokens = [
        t["token"]
        for ch in chunks
        if ch["choices"][0]["logprobs"]
        for t in ch["choices"][0]["logprobs"]["content"]
    ]
    assert tokens == ["H", "i", "!"]
    assert plain.json()["choices"][0]["logprobs"]["content"][0]["logprob"] == -0.5


async def test_logprobs_of_partial_characters_show_their_bytes() -> None:
    app, engine = make_app()
    outputs = reply("")
    half = GenerationOutput(
        text="", token_ids=[300], logprobs=[TokenLogprob(300, b"\xe2\x82", -0.1)]
    )
    rest = GenerationOutput(text="€", token_ids=[301], logprobs=[TokenLogprob(301, b"\xac", -0.2)])
    engine.outputs = [half, rest, *outputs]
    async with client(app) as c:
        body = {**CHAT, "logprobs": True}
        content = (await c.post("/v1/chat/completions", json=body)).json()
        stream = await c.post("/v1/chat/completions", json={**body, "stream": True})
    entries = content["choices"][0]["logprobs"]["content"]
    assert [e["bytes"] for e in entries] == [[0xE2, 0x82], [0xAC]]
    assert content["choices"][0]["message"]["content"] == "€"
    chunks = [json.loads(e) for e in sse_events(stream.text)[:-1]]
    # the output without text still streams, for its log-probability
    assert [c["choices"][0]["delta"].get("content") for c in chunks[1:3]] == ["", "€"]


async def test_completions_prompt_forms_give_choices() -> None:
    app, engine = make_app()
    async with client(app) as c:
        r = await c.post("/v1/completions", json={"prompt": "Once"})
        assert [ch["text"] for ch in r.json()["choices"]] == ["Hello world!"]
        assert r.json()["object"] == "text_completion"
        assert r.json()["id"].startswith("cmpl-")
        assert r.json()["timings"]["predicted_n"] == 12
        r = await c.post("/v1/completions", json={"prompt": [BOS, 100, 101]})
        assert len(r.json()["choices"]) == 1
        r = await c.post("/v1/completions", json={"prompt": [[BOS, 100], [BOS, 101]]})
        assert len(r.json()["choices"]) == 2
        r = await c.post("/completions", json={"prompt": ["x", 5]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    prompts = [(call.request.prompt, call.n) for call in engine.calls]
    assert prompts == [("Once", 1), ([BOS, 100, 101], 1), ([BOS, 100], 1), ([BOS, 101], 1)]


async def test_completions_prompts_times_n_usage_counts_each_prompt_once() -> None:
    app, engine = make_app()
    engine.next_outputs = [
        reply("a1", prompt_tokens=2, cached_tokens=1),
        reply("a2", prompt_tokens=2, cached_tokens=1),
        reply("b1", prompt_tokens=3),
        reply("b2x", "length", prompt_tokens=3),
    ]
    async with client(app) as c:
        r = await c.post("/v1/completions", json={"prompt": ["a", "b"], "n": 2})
        body = r.json()
        stream = await c.post(
            "/v1/completions",
            json={"prompt": ["a", "b"], "n": 2, "stream": True,
                  "stream_options": {"include_usage": True}},
        )  # fmt: skip
    assert [(call.request.prompt, call.n) for call in engine.calls] == [("a", 2), ("b", 2)] * 2
    choices = [(ch["index"], ch["text"], ch["finish_reason"]) for ch in body["choices"]]
    assert choices == [
        (0, "a1", "stop"),
        (1, "a2", "stop"),
        (2, "b1", "stop"),
        (3, "b2x", "length"),
    ]
    assert body["usage"] == {
        "prompt_tokens": 5,
        "completion_tokens": 9,
        "total_tokens": 14,
        "prompt_tokens_details": {"cached_tokens": 1},
    }
    chunks = [json.loads(e) for e in sse_events(stream.text)[:-1]]
    usage = chunks[-1]["usage"]  # the default script: 7 prompt tokens per prompt
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (14, 48)


async def test_completions_logprobs_echo_and_stream() -> None:
    app, engine = make_app()
    engine.outputs = reply("Hello world!", n_top=1)
    async with client(app) as c:
        r = await c.post("/v1/completions", json={"prompt": "Hi: ", "logprobs": 1, "echo": True})
        [choice] = r.json()["choices"]
        assert choice["text"] == "Hi: Hello world!"
        lp = choice["logprobs"]
        assert lp["tokens"][:2] == ["H", "e"]
        assert lp["token_logprobs"][0] == -0.5
        assert lp["top_logprobs"][0] == {"a": -1.0}
        assert lp["text_offset"][:3] == [4, 5, 6]  # after the echoed prompt
        r = await c.post("/v1/completions", json={"prompt": [BOS, *tok("ab")], "echo": True})
        assert r.json()["choices"][0]["text"] == "<s>abHello world!"  # tokens: detokenized
        body = {
            "prompt": "ab", "stream": True, "echo": True, "logprobs": 0,
            "stream_options": {"include_usage": True},
        }  # fmt: skip
        r = await c.post("/v1/completions", json=body)
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["text"] == "ab"  # the echo comes first
    assert "".join(ch["choices"][0]["text"] for ch in chunks[1:-1]) == "Hello world!"
    offsets = [o for ch in chunks[1:-2] for o in ch["choices"][0]["logprobs"]["text_offset"]]
    assert offsets == list(range(2, 14))
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 12
    assert engine.requests[0].sampling.n_probs == 1 and engine.requests[2].sampling.logprobs


async def test_completions_suffix_uses_fim_tokens() -> None:
    app, engine = make_app()
    async with client(app) as c:
        r = await c.post("/v1/completions", json={"prompt": "ab", "suffix": "c"})
        assert r.status_code == 200
        r = await c.post("/v1/completions", json={"prompt": ["a", "b"], "suffix": ""})
        assert r.status_code == 200
    assert engine.requests[0].prompt == [BOS, FIM_PRE, *tok("ab"), FIM_SUF, *tok("c"), FIM_MID]
    assert [req.prompt for req in engine.requests[1:]] == [
        [BOS, FIM_PRE, *tok("a"), FIM_SUF, FIM_MID],
        [BOS, FIM_PRE, *tok("b"), FIM_SUF, FIM_MID],
    ]
    app, engine = make_app(FakeEngine(has_fim=False))
    async with client(app) as c:
        r = await c.post("/v1/completions", json={"prompt": "ab", "suffix": "c"})
        assert r.status_code == 400 and "FIM" in r.json()["error"]["message"]
    assert not engine.calls


def _engine_with_embeddings() -> FakeEngine:
    return FakeEngine(EngineConfig(model="/m/emb.gguf", embeddings=True, pooling="mean"))


async def test_embeddings_float_and_base64() -> None:
    app, engine = make_app(_engine_with_embeddings())
    engine.embeddings = [EmbeddingResult([0.1, -2.0, 3.5], 4), EmbeddingResult([1.0, 0, 0], 8)]
    async with client(app) as c:
        r = await c.post("/v1/embeddings", json={"input": ["hello", "world"], "model": "x"})
        body = r.json()
        assert body["object"] == "list" and body["model"] == "emb"
        assert [(d["object"], d["index"]) for d in body["data"]] == [
            ("embedding", 0),
            ("embedding", 1),
        ]
        # the engine's vectors as they are: the serving layer does not normalize again
        assert [d["embedding"] for d in body["data"]] == [[0.1, -2.0, 3.5], [1.0, 0.0, 0.0]]
        assert body["usage"] == {"prompt_tokens": 12, "total_tokens": 12}
        engine.embeddings = engine.embeddings[:1]
        r = await c.post("/embeddings", json={"input": "hello", "encoding_format": "base64"})
        raw = base64.b64decode(r.json()["data"][0]["embedding"])
        decoded = struct.unpack("<3f", raw)
        assert all(
            math.isclose(a, b, rel_tol=1e-6) for a, b in zip(decoded, [0.1, -2.0, 3.5], strict=True)
        )
        r = await c.post("/v1/embeddings", json={"input": [[BOS, 100, 101]]})
        assert r.status_code == 200
        r = await c.post("/v1/embeddings", json={"input": [BOS, 100]})
        assert r.status_code == 200
    assert engine.embed_inputs == [["hello", "world"], ["hello"], [[BOS, 100, 101]], [[BOS, 100]]]


async def test_embeddings_disabled() -> None:
    app, engine = make_app()
    async with client(app) as c:
        r = await c.post("/v1/embeddings", json={"input": "x"})
        assert r.status_code == 501
        assert r.json()["error"]["type"] == "not_supported_error"
    assert not engine.embed_inputs


async def test_message_flattening_and_roles() -> None:
    app, engine = make_app()
    call = {"name": "f", "arguments": '{"x": 1}'}
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "function": call}]},
        {"role": "tool", "content": "42", "tool_call_id": "1", "name": "f"},
    ]
    async with client(app) as c:
        r = await c.post("/v1/chat/completions", json={"messages": messages})
    assert r.status_code == 200
    flat: list[dict[str, Any]] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "a\nb"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "1", "type": "function", "function": call}],
        },
        {"role": "tool", "content": "42", "name": "f", "tool_call_id": "1"},
    ]
    assert engine.templated == [flat]
    assert engine.requests[0].prompt == rendered(flat)
