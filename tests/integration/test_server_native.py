"""llama.cpp / LLaMA Box endpoints and the server's lifecycle, on a real server process."""

from __future__ import annotations

import contextlib
import json
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.server_fixtures import (
    ServerProcess,
    start_server,
    start_slow_loading_server,
)

pytestmark = pytest.mark.integration


def test_health_props_slots(tiny_server: ServerProcess) -> None:
    with tiny_server.http() as http:
        assert http.get("/health").json() == {"status": "ok"}
        props = http.get("/props").json()
        assert props["total_slots"] == 4
        assert props["default_generation_settings"]["n_ctx"] == 1024
        assert props["model_alias"] == "tiny"
        slots = http.get("/slots").json()
        assert [s["id"] for s in slots] == [0, 1, 2, 3]
        assert http.get("/slots?fail_on_no_slot=1").status_code == 200


def test_tokenize_roundtrip(tiny_server: ServerProcess) -> None:
    with tiny_server.http() as http:
        tokens = http.post("/tokenize", json={"content": "Hello world"}).json()["tokens"]
        assert tokens and all(isinstance(t, int) for t in tokens)
        assert http.post("/detokenize", json={"tokens": tokens}).json()["content"] == "Hello world"
        pieces = http.post("/tokenize", json={"content": "Hello", "with_pieces": True}).json()
        assert "".join(p["piece"] for p in pieces["tokens"]).strip() == "Hello"
        special = http.post("/tokenize", json={"content": "Hi", "add_special": True}).json()
        assert (
            len(special["tokens"])
            == len(http.post("/tokenize", json={"content": "Hi"}).json()["tokens"]) + 1
        )


def test_completion_native(tiny_server: ServerProcess) -> None:
    body = {
        "prompt": "Once upon",
        "n_predict": 6,
        "temperature": 0,
        "n_probs": 2,
        "return_tokens": True,
    }
    with tiny_server.http() as http:
        out = http.post("/completion", json=body).json()
        assert out["stop"] is True and out["tokens_predicted"] <= 6
        assert out["stop_type"] in ("limit", "eos", "word")
        assert len(out["tokens"]) == out["tokens_predicted"]
        assert out["timings"]["predicted_n"] == out["tokens_predicted"]
        assert len(out["completion_probabilities"]) == out["tokens_predicted"]
        with http.stream("POST", "/completion", json={**body, "stream": True}) as r:
            lines = [ln for ln in r.iter_lines() if ln]
    events = [json.loads(ln[len("data: ") :]) for ln in lines]
    assert events[-1]["stop"] is True and "timings" in events[-1]
    assert "".join(e["content"] for e in events) == out["content"]


def test_apply_template_infill_metrics(tiny_server: ServerProcess) -> None:
    with tiny_server.http() as http:
        prompt = http.post(
            "/apply-template", json={"messages": [{"role": "user", "content": "Hi"}]}
        )
        assert "Hi" in prompt.json()["prompt"]
        r = http.post("/infill", json={"input_prefix": "def f(", "input_suffix": "):"})
        assert r.status_code in (200, 400)
        if r.status_code == 400:
            assert "FIM" in r.json()["error"]["message"]
        metrics = http.get("/metrics")
        assert metrics.status_code == 200
        assert "llamacpp:tokens_predicted_total" in metrics.text
        assert "llamacpp:requests_processing" in metrics.text


def test_health_while_loading(tiny_model_path: Path) -> None:
    with start_slow_loading_server(tiny_model_path, delay=3.0) as server:
        deadline = time.monotonic() + 60
        status = None
        while status != 503:
            assert time.monotonic() < deadline, server.log()
            try:
                r = httpx.get(f"{server.base_url}/health", timeout=1)
                status = r.status_code
            except httpx.HTTPError:
                time.sleep(0.05)
        assert r.json()["error"]["message"] == "Loading model"
        assert r.json()["error"]["code"] == 503
        r = httpx.post(f"{server.base_url}/v1/completions", json={"prompt": "x"})
        assert r.status_code == 503
        # A listed model is one a client can use: not listed (503) until it is loaded.
        for path in ("/v1/models", "/models", f"/v1/models/{Path(tiny_model_path).stem}"):
            r = httpx.get(f"{server.base_url}{path}")
            assert r.status_code == 503, (path, r.text)
            assert r.headers["retry-after"] == "1"
            assert r.json()["error"]["message"] == "Loading model"
        # A client that waits for /v1/models, then sends at once, is served.
        while (r := httpx.get(f"{server.base_url}/v1/models")).status_code == 503:
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.02)
        assert r.status_code == 200 and r.json()["data"][0]["id"]
        body = {"prompt": "x", "max_tokens": 2}
        assert httpx.post(f"{server.base_url}/v1/completions", json=body).status_code == 200
        assert httpx.get(f"{server.base_url}/health").json() == {"status": "ok"}


def _stream_then_sigterm(server: ServerProcess, max_tokens: int) -> list[str]:
    """Stream a completion, SIGTERM the server once it is generating, return the lines read."""
    body = {"prompt": "a", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    lines: list[str] = []
    with httpx.stream("POST", f"{server.base_url}/v1/completions", json=body, timeout=60) as r:
        with contextlib.suppress(httpx.HTTPError):  # a cut stream may end abruptly
            for line in r.iter_lines():
                if line and not lines:
                    server.proc.send_signal(signal.SIGTERM)
                if line:
                    lines.append(line)
    return lines


def test_sigterm_lets_the_stream_finish(tiny_model_path: Path) -> None:
    with start_server(tiny_model_path, "-np", "2", "-c", "4096") as server:
        lines = _stream_then_sigterm(server, 600)
        assert server.proc.wait(30) == 0, server.log()
    assert lines[-1] == "data: [DONE]", lines[-3:]
    finish = json.loads(lines[-2][len("data: ") :])
    assert finish["choices"][0]["finish_reason"] == "length"
    assert finish["timings"]["predicted_n"] == 600


def test_sigterm_cancels_requests_past_the_timeout(tiny_model_path: Path) -> None:
    with start_server(tiny_model_path, "-np", "2", "-c", "8192", "--timeout", "1") as server:
        started = time.monotonic()
        lines = _stream_then_sigterm(server, 4000)  # ~10 s of generation
        assert server.proc.wait(30) == 0, server.log()
        assert time.monotonic() - started < 8
    assert lines and "data: [DONE]" not in lines


def test_model_load_failure_exits_nonzero(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with start_server(bad, wait=False) as server:
        assert server.proc.wait(60) == 1, server.log()
        assert "bad.gguf" in server.log() or "load" in server.log()


def test_a_native_prompt_mixes_token_ids_and_text(tiny_server: ServerProcess) -> None:
    """llama-server's /completion takes [12, " text", 34]: text pieces tokenized in place (only
    the first piece gets a BOS), ids as given; the result equals the same tokens sent as ids."""
    with tiny_server.http() as http:
        hello = http.post("/tokenize", json={"content": " Hello", "add_special": False}).json()
        world = http.post("/tokenize", json={"content": " world", "add_special": False}).json()
        ids = hello["tokens"] + world["tokens"]
        body = {"n_predict": 6, "temperature": 0, "return_tokens": True, "cache_prompt": False}
        mixed = http.post("/completion", json={**body, "prompt": [*hello["tokens"], " world"]})
        plain = http.post("/completion", json={**body, "prompt": ids})
        assert mixed.status_code == plain.status_code == 200, mixed.text
        assert mixed.json()["tokens_evaluated"] == plain.json()["tokens_evaluated"] == len(ids)
        assert mixed.json()["tokens"] == plain.json()["tokens"]
        bad = http.post("/completion", json={**body, "prompt": [1, {"x": 1}]})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt[1]"
