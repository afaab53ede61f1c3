"""llama.cpp / LLaMA Box endpoints on the wire, over the replaying fake engine."""

from __future__ import annotations

import json

import pytest
from tests.unit.fake_engine import (
    BOS,
    FIM_MID,
    FIM_PRE,
    FIM_SUF,
    N_CTX_SLOT,
    FakeEngine,
    client,
    make_app,
    rendered,
    reply,
    sse_events,
    tok,
)

from llamabox.api.state import VERSION
from llamabox.types import SamplingParams

pytestmark = pytest.mark.unit


async def test_props() -> None:
    defaults = SamplingParams(temperature=0.25, top_k=9)
    app, _ = make_app(alias="m", sampling=defaults, infill=False)
    async with client(app) as c:
        body = (await c.get("/props")).json()
    assert body["total_slots"] == 4
    assert body["model_alias"] == "m"
    assert body["model_path"] == "/models/fake-model.gguf"
    settings = body["default_generation_settings"]
    assert settings["n_ctx"] == N_CTX_SLOT  # per slot, as the engine reports it
    assert settings["model"] == "m" and settings["n_predict"] == -1
    assert settings["params"]["temperature"] == 0.25 and settings["params"]["top_k"] == 9
    # the effective defaults, with llama-server's names: a random seed is its 4294967295
    params = settings["params"]
    assert params["seed"] == 0xFFFFFFFF and params["n_predict"] == params["max_tokens"] == -1
    assert params["stop"] == [] and params["grammar"] == "" and params["logit_bias"] == []
    assert params["ignore_eos"] is False and params["n_probs"] == 0
    assert body["chat_template"] == "{{ fake }}"
    system = body["system_info"]
    assert system["backend"] in ("cpu", "custom") and "CPU" in system["backends"]
    assert any(d["type"] == "cpu" and d["memory_total"] > 0 for d in system["devices"])
    assert body["build_info"].startswith(f"llamabox {VERSION} ({system['backend']}, ")
    assert (body["bos_token"], body["eos_token"]) == ("<s>", "</s>")
    assert body["embeddings"] is False and body["infill"] is False
    assert body["modalities"] == {"vision": False, "audio": False}


async def test_props_infill_needs_fim_tokens() -> None:
    for has_fim, expected in ((True, True), (False, False)):
        app, _ = make_app(FakeEngine(has_fim=has_fim))
        async with client(app) as c:
            assert (await c.get("/props")).json()["infill"] is expected


async def test_slots_and_fail_on_no_slot() -> None:
    app, engine = make_app()
    async with client(app) as c:
        slots = (await c.get("/slots")).json()
        assert [s["id"] for s in slots] == [0, 1, 2, 3]
        assert all(s["state"] == 0 and not s["is_processing"] for s in slots)
        assert [s["n_cached"] for s in slots] == [0, 3, 6, 9]
        assert (await c.get("/slots?fail_on_no_slot=1")).status_code == 200
        held = engine.hold(3, request_id="other")
        slots = (await c.get("/slots")).json()
        assert [s["is_processing"] for s in slots] == [True, True, True, False]
        assert [s["id_task"] for s in slots] == ["other", "other", "other", None]
        assert (await c.get("/slots?fail_on_no_slot=true")).status_code == 200
        held += engine.hold(1)
        r = await c.get("/slots?fail_on_no_slot=1")
        assert r.status_code == 503
        assert r.json()["error"]["type"] == "unavailable_error"
        assert (await c.get("/slots")).status_code == 200
        for stream in held:
            stream.cancel()
        assert (await c.get("/slots?fail_on_no_slot=1")).status_code == 200
    app, _ = make_app(slots=False)
    async with client(app) as c:
        assert (await c.get("/slots")).status_code == 501


async def test_metrics() -> None:
    app, _ = make_app()
    async with client(app) as c:
        r = await c.get("/metrics")
        assert r.status_code == 501
    app, engine = make_app(metrics=True)
    held = engine.hold(5)  # 4 slots busy, 1 queued
    async with client(app) as c:
        r = await c.get("/metrics")
    for stream in held:
        stream.cancel()
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    lines = r.text.splitlines()
    values = {ln.split(" ")[0]: float(ln.split(" ")[1]) for ln in lines if not ln.startswith("#")}
    for name in (
        "prompt_tokens_total", "prompt_seconds_total", "tokens_predicted_total",
        "tokens_predicted_seconds_total", "tokens_drafted_total", "tokens_drafted_accepted_total",
        "prompt_tokens_seconds", "predicted_tokens_seconds", "kv_cache_usage_ratio",
        "kv_cache_tokens", "requests_processing", "requests_deferred",
    ):  # fmt: skip
        assert f"llamacpp:{name}" in values
        assert f"# TYPE llamacpp:{name}" in r.text
    assert values["llamacpp:prompt_tokens_seconds"] == 2000.0  # 100 tokens in 50 ms
    assert values["llamacpp:predicted_tokens_seconds"] == 100.0  # 30 tokens in 300 ms
    assert values["llamacpp:kv_cache_usage_ratio"] == 0.25
    assert values["llamacpp:prompt_seconds_total"] == 0.05
    assert values["llamacpp:tokens_drafted_accepted_total"] == 4
    assert values["llamacpp:requests_processing"] == 4
    assert values["llamacpp:requests_deferred"] == 1


async def test_tokenize_detokenize() -> None:
    app, engine = make_app()
    async with client(app) as c:
        r = await c.post("/tokenize", json={"content": "hé"})  # add_special off by default
        assert r.json() == {"tokens": tok("hé")}
        r = await c.post("/tokenize", json={"content": "h", "add_special": True})
        assert r.json() == {"tokens": [BOS, *tok("h")]}
        r = await c.post("/tokenize", json={"content": "hé", "with_pieces": True})
        assert r.json() == {
            "tokens": [{"id": tok("h")[0], "piece": "h"}, {"id": tok("é")[0], "piece": "é"}]
        }
        r = await c.post(
            "/tokenize", json={"content": "h", "add_special": True, "with_pieces": True}
        )
        assert r.json()["tokens"][0] == {"id": BOS, "piece": "<s>"}
        engine.pieces[tok("x")[0]] = b"\xe2\x82"  # half a character: not UTF-8 on its own
        r = await c.post("/tokenize", json={"content": "xa", "with_pieces": True})
        assert r.json()["tokens"] == [
            {"id": tok("x")[0], "piece": [0xE2, 0x82]},
            {"id": tok("a")[0], "piece": "a"},
        ]
        r = await c.post("/detokenize", json={"tokens": tok("ok")})
        assert r.json() == {"content": "ok"}
        r = await c.post("/detokenize", json={"tokens": []})
        assert r.json() == {"content": ""}
        r = await c.post("/tokenize", json={"text": "x"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "content"


async def test_tokenize_passes_its_flags_on() -> None:
    app, engine = make_app()
    seen: list[tuple[str, bool, bool]] = []
    original = engine.tokenize

    async def spy(text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        seen.append((text, add_special, parse_special))
        return await original(text, add_special, parse_special)

    engine.tokenize = spy  # type: ignore[method-assign]
    async with client(app) as c:
        await c.post("/tokenize", json={"content": "a"})
        await c.post(
            "/tokenize", json={"content": "b", "add_special": True, "parse_special": False}
        )
    assert seen == [("a", False, True), ("b", True, False)]


async def test_apply_template() -> None:
    app, engine = make_app()
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Y"}, {"type": "text", "text": "o"}]},
    ]
    async with client(app) as c:
        r = await c.post("/apply-template", json={"messages": messages})
    flat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Y\no"}]
    assert engine.templated == [flat]
    assert r.json() == {"prompt": rendered(flat)}  # the engine's rendering, as it is
    assert not engine.calls


async def test_completion_native_shape() -> None:
    app, engine = make_app()
    engine.outputs = reply("Hello", "length", prompt_tokens=4, cached_tokens=1, n_top=2)
    async with client(app) as c:
        body = {
            "prompt": "Say",
            "n_predict": 5,
            "n_probs": 2,
            "return_tokens": True,
            "stop": ["zz"],
        }
        r = await c.post("/completion", json=body)
    out = r.json()
    assert out["content"] == "Hello"
    assert out["stop"] is True
    assert (out["tokens_predicted"], out["tokens_evaluated"], out["tokens_cached"]) == (5, 4, 1)
    assert out["stop_type"] == "limit"
    assert out["stopping_word"] == ""
    assert out["truncated"] is False and out["has_new_line"] is False
    assert out["tokens"] == tok("Hello")
    assert out["model"] == "fake-model"
    assert (out["index"], out["id_slot"]) == (0, -1)
    timings = out["timings"]
    assert (timings["cache_n"], timings["prompt_n"], timings["predicted_n"]) == (1, 3, 5)
    assert timings["prompt_ms"] == 2.0 and timings["predicted_per_second"] == 1250.0
    probs = out["completion_probabilities"]
    assert probs[0] == {
        "id": tok("H")[0],
        "token": "H",
        "bytes": [ord("H")],
        "logprob": -0.5,
        "top_logprobs": [
            {"id": tok("a")[0], "token": "a", "bytes": [97], "logprob": -1.0},
            {"id": tok("b")[0], "token": "b", "bytes": [98], "logprob": -2.0},
        ],
    }
    assert [p["token"] for p in probs] == list("Hello")
    [call] = engine.calls
    request = call.request
    assert request.prompt == "Say" and call.n == 1
    assert request.max_tokens == 5 and request.stop == ["zz"]
    assert request.sampling.n_probs == 2 and request.sampling.logprobs


async def test_completion_max_tokens_alias_and_no_limit() -> None:
    app, engine = make_app()
    async with client(app) as c:
        for body in (
            {"prompt": "x", "max_tokens": 7},
            {"prompt": "x", "n_predict": 3, "max_tokens": 7},  # n_predict wins
            {"prompt": "x", "n_predict": -1},  # the server's default
            {"prompt": "x"},
        ):
            assert (await c.post("/completion", json=body)).status_code == 200
    assert [req.max_tokens for req in engine.requests] == [7, 3, None, None]


async def test_completion_stop_type_follows_the_engine() -> None:
    app, engine = make_app()
    async with client(app) as c:
        engine.next_outputs = [reply("Hell", stop_word="o w")]
        out = (await c.post("/completion", json={"prompt": "x", "stop": ["o w"]})).json()
        assert out["content"] == "Hell"
        assert (out["stop_type"], out["stopping_word"]) == ("word", "o w")
        engine.next_outputs = [reply("Hi\nthere")]
        out = (await c.post("/completion", json={"prompt": "x"})).json()
        assert (out["stop_type"], out["stopping_word"]) == ("eos", "")
        assert out["has_new_line"] is True
        assert "tokens" not in out and "completion_probabilities" not in out


async def test_completion_stream_has_no_done() -> None:
    app, engine = make_app()
    engine.outputs = reply("Hi!", "length", prompt_tokens=3, n_top=1)
    async with client(app) as c:
        body = {"prompt": "x", "stream": True, "return_tokens": True, "n_probs": 1}
        r = await c.post("/completion", json=body)
    events = [json.loads(e) for e in sse_events(r.text)]
    assert [e["content"] for e in events] == ["H", "i", "!", ""]
    assert [e.get("tokens") for e in events[:-1]] == [tok("H"), tok("i"), tok("!")]
    assert all(e["stop"] is False for e in events[:-1])
    assert all(len(e["completion_probabilities"]) == 1 for e in events[:-1])
    last = events[-1]
    assert last["stop"] is True and last["content"] == ""
    assert last["tokens"] == [] and last["completion_probabilities"] == []
    assert (last["stop_type"], last["tokens_predicted"], last["tokens_evaluated"]) == (
        "limit",
        3,
        3,
    )
    assert last["timings"]["predicted_n"] == 3


async def test_completion_prompt_with_tokens_and_text() -> None:
    app, engine = make_app()
    async with client(app) as c:
        r = await c.post("/completion", json={"prompt": ["ab", 7, "c"]})
        assert r.status_code == 200
        r = await c.post("/completion", json={"prompt": [BOS, 99], "temperature": -1})
        assert r.status_code == 200
        r = await c.post("/completion", json={"prompt": "plain"})
        assert r.status_code == 200
    # Only the first text piece gets a BOS.
    assert engine.requests[0].prompt == [BOS, *tok("ab"), 7, *tok("c")]
    assert engine.requests[1].prompt == [BOS, 99]
    assert engine.requests[1].sampling.temperature == 0.0  # llama.cpp: negative is greedy
    assert engine.requests[2].prompt == "plain"  # text goes to the engine as text
    assert all(req.add_special for req in engine.requests)


async def test_infill() -> None:
    app, engine = make_app()
    async with client(app) as c:
        body = {"input_prefix": "a", "input_suffix": "b", "prompt": "c"}
        r = await c.post("/infill", json=body)
        assert r.status_code == 200 and r.json()["content"] == "Hello world!"
        extra = [{"filename": "f", "text": "t"}]
        assert (await c.post("/infill", json={**body, "input_extra": extra})).status_code == 200
        r = await c.post("/infill", json={**body, "prompt": [1, 2]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    pre, suf, mid = [FIM_PRE], [FIM_SUF], [FIM_MID]
    assert engine.requests[0].prompt == [BOS, *pre, *tok("a"), *suf, *tok("b"), *mid, *tok("c")]
    assert engine.requests[1].prompt == [
        BOS, *tok("f\nt\n"), *pre, *tok("a"), *suf, *tok("b"), *mid, *tok("c"),
    ]  # fmt: skip
    assert len(engine.calls) == 2

    app, engine = make_app(FakeEngine(has_fim=False))
    async with client(app) as c:
        r = await c.post("/infill", json={"input_prefix": "a"})
        assert r.status_code == 400 and "FIM" in r.json()["error"]["message"]
    assert not engine.calls
    app, _ = make_app(infill=False)
    async with client(app) as c:
        assert (await c.post("/infill", json={"input_prefix": "a"})).status_code == 501


async def test_props_report_the_servers_seed() -> None:
    from llamabox.types import EngineConfig

    engine = FakeEngine(EngineConfig(model="/models/fake-model.gguf", n_parallel=2, seed=42))
    app, _ = make_app(engine)
    async with client(app) as c:
        params = (await c.get("/props")).json()["default_generation_settings"]["params"]
    assert params["seed"] == 42
