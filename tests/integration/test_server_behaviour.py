"""What the engine does behind each API, on a real server with the tiny random model: stop
strings, token limits, the context length, the chat template, prompt caching, seeds of ``n``
choices, embeddings.

The unit tests (tests/unit) check the wire over a fake that replays scripted outputs; these check
the behaviour the fake does not simulate. The tiny model's text is random-looking: the tests
assert properties of it (a stop string cuts the output where the unstopped output has it, a
limit gives that many tokens), never the text itself.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.server_fixtures import ServerProcess, start_server

pytestmark = [pytest.mark.integration]

PROMPT = "Once upon a time"
MESSAGES = [{"role": "user", "content": "Tell me a story."}]
N_TOKENS = 16
GREEDY = {"temperature": 0}
APIS = ["completions", "chat", "native", "ollama"]


# ---- helpers: one generation through each API, as (text, finish, last object) ----


def _sse(raw: bytes) -> list[Any]:
    """The JSON events of an SSE body (not ``iter_lines()``: it also splits at U+2028, which
    JSON leaves unescaped in the random model's text)."""
    assert raw.endswith(b"\n\n"), raw[-200:]
    events = [e.removeprefix("data: ") for e in raw[:-2].decode().split("\n\n")]
    return [json.loads(e) for e in events if e != "[DONE]"]


def _body(api: str, limit: int, stop: list[str] | None, stream: bool) -> tuple[str, dict[str, Any]]:
    if api == "ollama":  # no ignore_eos among Ollama's options
        options: dict[str, Any] = {"num_predict": limit, **GREEDY}
        if stop is not None:
            options["stop"] = stop
        return "/api/generate", {
            "prompt": PROMPT,
            "raw": True,
            "stream": stream,
            "options": options,
        }
    body: dict[str, Any] = {**GREEDY, "ignore_eos": True, "stream": stream}
    if stop is not None:
        body["stop"] = stop
    if api == "completions":
        return "/v1/completions", {**body, "prompt": PROMPT, "max_tokens": limit}
    if api == "chat":
        return "/v1/chat/completions", {**body, "messages": MESSAGES, "max_tokens": limit}
    return "/completion", {**body, "prompt": PROMPT, "n_predict": limit}


def _generate(
    http: httpx.Client,
    api: str,
    *,
    limit: int = N_TOKENS,
    stop: list[str] | None = None,
    stream: bool = False,
) -> tuple[str, str, dict[str, Any]]:
    """The text, how it ended (finish_reason, stop_type or done_reason) and the last object."""
    path, body = _body(api, limit, stop, stream)
    if stream and api in ("completions", "chat"):
        body["stream_options"] = {"include_usage": True}
    r = http.post(path, json=body)
    assert r.status_code == 200, r.text
    if api == "ollama":
        lines = [json.loads(x) for x in r.text.split("\n") if x] if stream else [r.json()]
        return "".join(x["response"] for x in lines), lines[-1]["done_reason"], lines[-1]
    if api == "native":
        events = _sse(r.content) if stream else [r.json()]
        return "".join(e["content"] for e in events), events[-1]["stop_type"], events[-1]
    if not stream:
        out = r.json()
        [choice] = out["choices"]
        text = choice["text"] if api == "completions" else choice["message"]["content"]
        return text, choice["finish_reason"], out
    chunks = _sse(r.content)
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    pieces = [c["text"] if api == "completions" else c["delta"].get("content", "") for c in choices]
    finishes = [c["finish_reason"] for c in choices if c["finish_reason"]]
    assert len(finishes) == 1, finishes
    return "".join(pieces), finishes[0], chunks[-1]


def _stops_in(text: str) -> tuple[str, int, str]:
    """A 3-character stop string first found in the middle of ``text``, where it is, and
    another one found only after it."""

    def first_at(k: int) -> bool:
        s = text[k : k + 3]
        return text.find(s) == k and bool(s.strip()) and "\ufffd" not in s

    k = next((k for k in range(len(text) // 3, len(text) - 9) if first_at(k)), None)
    assert k is not None, f"no stop string to pick in {text!r}"
    later = next((j for j in range(k + 3, len(text) - 2) if first_at(j)), None)
    assert later is not None, f"no second stop string to pick in {text!r}"
    return text[k : k + 3], k, text[later : later + 3]


def _n_tokens(http: httpx.Client, text: str) -> int:
    """Tokens of a text prompt as the engine counts them (with the BOS)."""
    body = {"content": text, "add_special": True, "parse_special": True}
    return len(http.post("/tokenize", json=body).json()["tokens"])


def _norm(vector: list[float]) -> float:
    return math.sqrt(sum(x * x for x in vector))


# ---- stop strings ----


@pytest.mark.parametrize("api", APIS)
def test_stop_string_cuts_the_output_where_it_first_appears(
    tiny_server: ServerProcess, api: str
) -> None:
    with tiny_server.http() as http:
        full, _, _ = _generate(http, api)
        stop, at, later = _stops_in(full)
        # The one found first in the text wins, wherever it is in the list.
        stops = [later, stop, "\x00never"]
        for stream in (False, True):
            text, finish, last = _generate(http, api, stop=stops, stream=stream)
            assert text == full[:at], (stream, stop, full)
            assert finish == ("word" if api == "native" else "stop"), (stream, finish)
            if api == "native":
                assert last["stopping_word"] == stop


def test_stop_strings_do_not_leak_into_streamed_chunks(tiny_server: ServerProcess) -> None:
    """Held back while they might be a stop string's start: no chunk shows part of one."""
    with tiny_server.http() as http:
        full, _, _ = _generate(http, "completions", limit=24)
        stop, at, _ = _stops_in(full)
        path, body = _body("completions", 24, [stop], True)
        chunks = _sse(http.post(path, json=body).content)
    texts = [c["choices"][0]["text"] for c in chunks if c["choices"]]
    assert "".join(texts) == full[:at]
    assert all(stop not in t for t in texts)


# ---- token limits ----


def test_max_tokens_is_the_number_of_tokens_generated(tiny_server: ServerProcess) -> None:
    base: dict[str, Any] = {"ignore_eos": True, "temperature": 0.7}
    with tiny_server.http() as http:
        for prompt, n in ((PROMPT, 1), ([1, 450, 4996], 1), (PROMPT, 2)):
            body = {**base, "prompt": prompt, "max_tokens": 5, "n": n}
            out = http.post("/v1/completions", json=body).json()
            assert [c["finish_reason"] for c in out["choices"]] == ["length"] * n, out
            assert out["usage"]["completion_tokens"] == 5 * n
            assert out["timings"]["predicted_n"] == 5
        for limit in ({"max_tokens": 5}, {"max_completion_tokens": 5, "max_tokens": 9}):
            out = http.post("/v1/chat/completions", json={**base, "messages": MESSAGES, **limit})
            assert out.json()["choices"][0]["finish_reason"] == "length"
            assert out.json()["usage"]["completion_tokens"] == 5
        for limit in ({"n_predict": 5}, {"max_tokens": 5}, {"n_predict": 5, "max_tokens": 9}):
            body = {**base, "prompt": PROMPT, "return_tokens": True, **limit}
            out = http.post("/completion", json=body).json()
            assert (out["stop_type"], out["tokens_predicted"]) == ("limit", 5), limit
            assert len(out["tokens"]) == 5
        for api in ("completions", "chat", "native"):
            _, finish, last = _generate(http, api, limit=5, stream=True)
            assert finish == ("limit" if api == "native" else "length")
            count = (
                last["tokens_predicted"] if api == "native" else last["usage"]["completion_tokens"]
            )
            assert count == 5, api


def test_ollama_num_predict_gives_what_completions_give(tiny_server: ServerProcess) -> None:
    """Ollama has no ignore_eos: compare with the same greedy raw prompt through /v1/completions,
    which (without ignore_eos either) may end at EOS just the same."""
    with tiny_server.http() as http:
        body = {"prompt": PROMPT, "max_tokens": 5, **GREEDY}
        reference = http.post("/v1/completions", json=body).json()
        text, done_reason, last = _generate(http, "ollama", limit=5)
        streamed, _, _ = _generate(http, "ollama", limit=5, stream=True)
    [choice] = reference["choices"]
    assert text == streamed == choice["text"]
    assert done_reason == choice["finish_reason"]
    assert last["eval_count"] == reference["usage"]["completion_tokens"]
    assert last["prompt_eval_count"] == reference["usage"]["prompt_tokens"]
    if done_reason == "length":
        assert last["eval_count"] == 5


def test_server_default_n_predict_applies_where_a_request_sets_no_limit(
    tiny_model_path: Path,
) -> None:
    with start_server(tiny_model_path, "-np", "1", "-c", "1024", "-n", "6") as server:
        with server.http() as http:
            base = {"prompt": PROMPT, "ignore_eos": True}
            for body, expected in (
                (base, 6),
                ({**base, "max_tokens": -1}, 6),
                ({**base, "max_tokens": 3}, 3),
                ({**base, "max_tokens": 9}, 9),  # a request may ask for more than the default
            ):
                out = http.post("/v1/completions", json=body).json()
                assert out["usage"]["completion_tokens"] == expected, body
                assert out["choices"][0]["finish_reason"] == "length"
            chat = {"messages": MESSAGES, "ignore_eos": True}
            out = http.post("/v1/chat/completions", json=chat).json()
            assert out["usage"]["completion_tokens"] == 6
            out = http.post("/completion", json={**base, "n_predict": -1}).json()
            assert (out["tokens_predicted"], out["stop_type"]) == (6, "limit")
            assert http.get("/props").json()["default_generation_settings"]["n_predict"] == 6


# ---- the context length ----


def test_prompt_longer_than_the_slot_context_names_both_counts(tiny_server: ServerProcess) -> None:
    with tiny_server.http() as http:
        n_ctx_slot = http.get("/props").json()["default_generation_settings"]["n_ctx"]
        text = "word " * (n_ctx_slot + 50)
        n_text = _n_tokens(http, text)
        messages = [{"role": "user", "content": text}]
        chat_prompt = http.post("/apply-template", json={"messages": messages}).json()["prompt"]
        n_chat = _n_tokens(http, chat_prompt)
        tokens = [1] + [450] * (n_ctx_slot + 10)
        assert n_text > n_ctx_slot and n_chat > n_text
        for path, body, n_prompt in (
            ("/v1/completions", {"prompt": text, "max_tokens": 1}, n_text),
            ("/v1/completions", {"prompt": text, "stream": True}, n_text),
            ("/v1/completions", {"prompt": tokens}, len(tokens)),
            ("/v1/completions", {"prompt": ["short", text], "n": 2}, n_text),
            ("/v1/chat/completions", {"messages": messages, "stream": True}, n_chat),
            ("/completion", {"prompt": text, "stream": True}, n_text),
            ("/completion", {"prompt": [1] * n_ctx_slot}, n_ctx_slot),  # no room for a token
        ):
            r = http.post(path, json=body)
            assert r.status_code == 400, (path, r.text)  # before anything streams
            assert r.json()["error"] == {
                "message": f"prompt has {n_prompt} tokens, context per slot is {n_ctx_slot}",
                "type": "invalid_request_error",
                "param": "prompt",
                "code": "context_length_exceeded",
            }, path
        for path, body, n_prompt in (
            ("/api/generate", {"prompt": text, "raw": True}, n_text),
            ("/api/chat", {"messages": messages}, n_chat),
        ):
            r = http.post(path, json=body)
            assert r.status_code == 400
            assert r.json() == {
                "error": f"prompt has {n_prompt} tokens, context per slot is {n_ctx_slot}"
            }
        # The longest prompt that fits: its slot has room for one more token.
        body = {"prompt": [1] * (n_ctx_slot - 1), "max_tokens": 8, "ignore_eos": True}
        out = http.post("/v1/completions", json=body).json()
        assert out["choices"][0]["finish_reason"] == "length"
        assert out["usage"]["prompt_tokens"] == n_ctx_slot - 1
        assert out["usage"]["total_tokens"] <= n_ctx_slot
        assert http.get("/health").status_code == 200


# ---- the vocabulary ----


def test_token_ids_outside_the_vocabulary_are_400s_naming_their_field(
    tiny_server: ServerProcess,
) -> None:
    with tiny_server.http() as http:
        n_vocab = http.get("/v1/models").json()["data"][0]["meta"]["n_vocab"]
        chat = {"messages": MESSAGES, "max_tokens": 1}
        cases: list[tuple[str, dict[str, Any], str, int]] = [
            ("/v1/completions", {"prompt": [1, n_vocab], "max_tokens": 1}, "prompt", n_vocab),
            ("/v1/completions", {"prompt": [[1], [1, -3]], "max_tokens": 1}, "prompt", -3),
            ("/completion", {"prompt": ["text", n_vocab + 5], "n_predict": 1}, "prompt",
             n_vocab + 5),
            ("/v1/completions", {"prompt": "x", "max_tokens": 1, "logit_bias": {str(n_vocab): 1}},
             "logit_bias", n_vocab),
            ("/v1/chat/completions", {**chat, "logit_bias": {"-1": -100}}, "logit_bias", -1),
            ("/completion", {"prompt": "x", "logit_bias": [[n_vocab, False]]}, "logit_bias",
             n_vocab),
            ("/detokenize", {"tokens": [5, n_vocab]}, "tokens", n_vocab),
            ("/detokenize", {"tokens": [-5]}, "tokens", -5),
            ("/v1/embeddings", {"input": [[1, n_vocab]]}, "input", n_vocab),
        ]  # fmt: skip
        for path, body, param, token in cases:
            r = http.post(path, json=body)
            assert r.status_code == 400, (path, r.text)
            error = r.json()["error"]
            assert (error["param"], error["type"]) == (param, "invalid_request_error"), (
                path,
                error,
            )
            assert str(token) in error["message"], (path, error)


# ---- the chat template ----


def test_chat_prompt_is_the_template_applied_to_the_flattened_messages(
    tiny_server: ServerProcess,
) -> None:
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
    ]
    flat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a\nb"}]
    with tiny_server.http() as http:
        prompt = http.post("/apply-template", json={"messages": messages}).json()["prompt"]
        assert prompt == http.post("/apply-template", json={"messages": flat}).json()["prompt"]
        assert "Be brief." in prompt and "a\nb" in prompt
        assert prompt.index("Be brief.") < prompt.index("a\nb")
        n_prompt = _n_tokens(http, prompt)  # tokenizing the rendered prompt adds the BOS
        greedy = {"max_tokens": 8, "ignore_eos": True, **GREEDY}
        chat = http.post("/v1/chat/completions", json={"messages": messages, **greedy}).json()
        assert chat["usage"]["prompt_tokens"] == n_prompt
        # The same tokens, so the same greedy continuation, as the rendered prompt as text.
        completion = http.post("/v1/completions", json={"prompt": prompt, **greedy}).json()
        assert chat["choices"][0]["message"]["content"] == completion["choices"][0]["text"]
        options = {"num_predict": 1, **GREEDY}
        ollama_chat = http.post(
            "/api/chat", json={"messages": flat, "stream": False, "options": options}
        ).json()
        assert ollama_chat["prompt_eval_count"] == n_prompt
        generate = {"system": "Be brief.", "prompt": "a\nb", "stream": False, "options": options}
        ollama_generate = http.post("/api/generate", json=generate).json()
        assert ollama_generate["prompt_eval_count"] == n_prompt


# ---- prompt caching ----


def test_cached_prompt_tokens_are_reported(tiny_server: ServerProcess) -> None:
    prefix = " ".join(f"item{i}" for i in range(100))
    with tiny_server.http() as http:
        n_prefix = _n_tokens(http, prefix)
        assert n_prefix >= 150
        first = http.post("/v1/completions", json={"prompt": prefix + " one", "max_tokens": 1})
        assert first.status_code == 200
        second = http.post("/v1/completions", json={"prompt": prefix + " two", "max_tokens": 1})
        usage, timings = second.json()["usage"], second.json()["timings"]
        cached = usage["prompt_tokens_details"]["cached_tokens"]
        assert n_prefix - 1 <= cached < usage["prompt_tokens"]
        assert timings["cache_n"] == cached
        assert timings["prompt_n"] == usage["prompt_tokens"] - cached
        native = http.post("/completion", json={"prompt": prefix + " three", "n_predict": 1})
        assert native.json()["tokens_cached"] >= n_prefix - 1
        body = {"prompt": prefix + " four", "max_tokens": 1, "cache_prompt": False}
        cold = http.post("/v1/completions", json=body).json()
        assert cold["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert cold["timings"]["prompt_n"] == cold["usage"]["prompt_tokens"]


# ---- n choices ----


def test_choice_j_of_n_samples_with_seed_plus_j(tiny_server: ServerProcess) -> None:
    """Checked on the first token, sampled from the prompt's logits: the choices share one
    prefill, like a request alone that reuses no cache. (Later tokens of a choice come from
    batches of several sequences, whose logits differ from a lone one's, and from one run to
    the next, in the last bits: enough to flip a sample now and then at temperature 1.)"""
    sampling = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "ignore_eos": True}
    body = {"prompt": PROMPT, "max_tokens": 1, "cache_prompt": False, **sampling}
    with tiny_server.http() as http:
        choices = http.post("/v1/completions", json={**body, "n": 4, "seed": 5}).json()
        alone = [
            http.post("/v1/completions", json={**body, "seed": 5 + j}).json() for j in range(4)
        ]
        texts = [c["text"] for c in choices["choices"]]
        assert texts == [a["choices"][0]["text"] for a in alone]
        assert len(set(texts)) > 1
        # The prompt counts once, the completions add up.
        assert choices["usage"]["prompt_tokens"] == alone[0]["usage"]["prompt_tokens"]
        assert choices["usage"]["completion_tokens"] == 4
        longer = {**body, "max_tokens": 8, "n": 3}
        for seed in (5, 2**63 - 1, -1):  # the largest seed, and random ones
            out = http.post("/v1/completions", json={**longer, "seed": seed})
            assert out.status_code == 200, out.text
            assert len({c["text"] for c in out.json()["choices"]}) == 3, seed
            assert out.json()["usage"]["completion_tokens"] == 3 * 8


# ---- embeddings ----


def test_embeddings_count_tokens_take_token_inputs_and_truncate(
    tiny_server: ServerProcess,
) -> None:
    texts = ["hello world", "a b c"]
    with tiny_server.http() as http:
        out = http.post("/v1/embeddings", json={"input": texts}).json()
        counts = [_n_tokens(http, t) for t in texts]
        assert out["usage"] == {"prompt_tokens": sum(counts), "total_tokens": sum(counts)}
        vector = out["data"][0]["embedding"]
        tokens = http.post("/tokenize", json={"content": texts[0], "add_special": True}).json()
        by_tokens = http.post("/v1/embeddings", json={"input": tokens["tokens"]}).json()
        assert by_tokens["usage"]["prompt_tokens"] == counts[0]
        assert all(
            math.isclose(a, b, abs_tol=1e-5)
            for a, b in zip(vector, by_tokens["data"][0]["embedding"], strict=True)
        )
        ollama = http.post("/api/embed", json={"input": texts[0]}).json()
        assert ollama["prompt_eval_count"] == counts[0]
        assert all(
            math.isclose(a, b, abs_tol=1e-5)
            for a, b in zip(vector, ollama["embeddings"][0], strict=True)
        )
        # Too long for one batch: cut to what fits, still a unit vector.
        long = http.post("/api/embed", json={"input": ["short", "word " * 2000]}).json()
        # n_ubatch (512 by default): the longest input one batch takes
        assert long["prompt_eval_count"] == _n_tokens(http, "short") + 512
        assert all(math.isclose(_norm(v), 1.0, rel_tol=1e-4) for v in long["embeddings"])
