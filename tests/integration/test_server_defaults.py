"""Server-wide defaults against what a request asks for, on real servers (the tiny model).

A request's own output constraint (a grammar, a JSON schema, response_format, Ollama's format)
replaces the server's default constraint, whichever kind either is, on every route.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.server_fixtures import ServerProcess, start_server

pytestmark = pytest.mark.integration

YES_NO = 'root ::= "yes" | "no"'
SCHEMA = {
    "type": "object",
    "properties": {"a": {"enum": ["x", "y"]}},
    "required": ["a"],
    "additionalProperties": False,
}
MESSAGES = [{"role": "user", "content": "Answer."}]


@pytest.fixture(scope="module")
def grammar_server(tiny_model_path: Path) -> Iterator[ServerProcess]:
    flags = ["-np", "2", "-c", "2048", "-a", "tiny", "--grammar", YES_NO]
    with start_server(tiny_model_path, *flags, "--chat-template", "llama3") as server:
        yield server


@pytest.fixture(scope="module")
def schema_server(tiny_model_path: Path) -> Iterator[ServerProcess]:
    flags = ["-np", "2", "-c", "2048", "-a", "tiny", "--json-schema", json.dumps(SCHEMA)]
    with start_server(tiny_model_path, *flags) as server:
        yield server


def _check_schema_output(text: str) -> None:
    assert json.loads(text)["a"] in ("x", "y"), text


def test_request_schema_replaces_server_grammar(grammar_server: ServerProcess) -> None:
    client = grammar_server.openai()
    schema_format = {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}
    chat = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,  # type: ignore[arg-type]
        max_tokens=64,
        response_format=schema_format,  # type: ignore[arg-type]
    )
    _check_schema_output(chat.choices[0].message.content or "")
    cmpl = client.completions.create(
        model="tiny", prompt="Answer:", max_tokens=64, extra_body={"json_schema": SCHEMA}
    )
    _check_schema_output(cmpl.choices[0].text)
    with grammar_server.http() as http:
        native = http.post("/completion", json={"prompt": "Answer:", "json_schema": SCHEMA})
        assert native.status_code == 200, native.text
        _check_schema_output(native.json()["content"])
        body = {"model": "tiny", "prompt": "Answer:", "stream": False, "format": SCHEMA}
        ollama = http.post("/api/generate", json=body)
        assert ollama.status_code == 200, ollama.text
        _check_schema_output(ollama.json()["response"])
        body = {"model": "tiny", "messages": MESSAGES, "stream": False, "format": "json"}
        ollama_chat = http.post("/api/chat", json={**body, "options": {"num_predict": 64}})
        assert ollama_chat.status_code == 200, ollama_chat.text
        assert ollama_chat.json()["message"]["content"].lstrip().startswith("{")
        # Without a constraint of its own, a request gets the server's.
        plain = http.post("/completion", json={"prompt": "Answer:", "n_predict": 8})
        assert plain.json()["content"] in ("yes", "no")
        # A request that gives both kinds itself is still told to pick one.
        both = {"prompt": "x", "grammar": YES_NO, "json_schema": SCHEMA}
        assert http.post("/completion", json=both).status_code == 400


def test_request_grammar_replaces_server_schema(schema_server: ServerProcess) -> None:
    with schema_server.http() as http:
        plain = http.post("/completion", json={"prompt": "Answer:", "n_predict": 64})
        assert plain.status_code == 200, plain.text
        _check_schema_output(plain.json()["content"])
        for path, body in (
            ("/completion", {"prompt": "Answer:", "grammar": YES_NO}),
            ("/v1/completions", {"prompt": "Answer:", "grammar": YES_NO, "max_tokens": 8}),
            ("/v1/chat/completions", {"messages": MESSAGES, "grammar": YES_NO, "max_tokens": 8}),
        ):
            r = http.post(path, json=body)
            assert r.status_code == 200, (path, r.text)
            out = r.json()
            text = out["content"] if "content" in out else out["choices"][0]
            if isinstance(text, dict):
                text = text.get("text") or text["message"]["content"]
            assert text in ("yes", "no"), (path, out)


def test_builtin_chat_template_name(grammar_server: ServerProcess) -> None:
    with grammar_server.http() as http:
        prompt = http.post("/apply-template", json={"messages": MESSAGES}).json()["prompt"]
        assert prompt == (
            "<|start_header_id|>user<|end_header_id|>\n\nAnswer.<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n"
        )
        assert http.get("/props").json()["chat_template"] == "llama3"


def test_unknown_template_name_fails_at_start(tiny_model_path: Path) -> None:
    with start_server(tiny_model_path, "--chat-template", "llama-9", wait=False) as server:
        assert server.proc.wait(60) != 0
        assert "neither a built-in template" in server.log()
