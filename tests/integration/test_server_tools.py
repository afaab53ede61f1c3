"""Tool calling over HTTP with the official openai SDK, on tiny random models carrying real
families' templates.

A random model never chooses to call a tool, so these tests force calls (``tool_choice``
"required" or a named function): the grammar then decides every structural token, whatever the
CPU's kernels make of the random weights. The arguments' schema has an enum alone, so that no
free text can run on. What the model says between, and whether ``auto`` calls, is left to the
real model's tests (test_tools_qwen.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.fixtures.chat import WEATHER_TOOL, family_model
from tests.integration.server_fixtures import ServerProcess, start_server

pytestmark = pytest.mark.integration

WEATHER = WEATHER_TOOL
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {}, "additionalProperties": False},
    },
}
TOOLS: Any = [WEATHER, CLOCK]
USER: Any = [{"role": "user", "content": "Weather in Paris?"}]

# family: (template, extra serve flags)
FAMILIES = {
    "qwen2.5": ("Qwen-Qwen2.5-7B-Instruct.jinja", []),
    "hermes3": ("NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja", []),
    "llama3.1": ("meta-llama-Llama-3.1-8B-Instruct.jinja", []),
    # a reasoning template, with its reasoning off (free text a random model never ends)
    "qwen3": ("Qwen-Qwen3-0.6B.jinja", ["--chat-template-kwargs", '{"enable_thinking": false}']),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    family: str = request.param
    template, flags = FAMILIES[family]
    model = family_model(tmp_path_factory.mktemp("tools") / f"{family}.gguf", template)
    with start_server(model, "-np", "2", "-c", "4096", "-a", "tiny", *flags) as s:
        yield s


def ask(client: openai.OpenAI, **kwargs: Any) -> Any:
    args: dict[str, Any] = {"model": "tiny", "messages": USER, "tools": TOOLS}
    args |= {"max_tokens": 400, "temperature": 0, "parallel_tool_calls": False} | kwargs
    return client.chat.completions.create(**args)


def test_required_calls_a_tool(server: ServerProcess) -> None:
    with server.openai() as client:
        out = ask(client, tool_choice="required")
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id
    assert call.function.name in {"get_weather", "get_time"}
    args = json.loads(call.function.arguments)
    if call.function.name == "get_weather":
        assert args in ({"unit": "c"}, {"unit": "f"})


def test_named_function_is_the_one_called(server: ServerProcess) -> None:
    with server.openai() as client:
        for name in ("get_time", "get_weather"):
            out = ask(client, tool_choice={"type": "function", "function": {"name": name}})
            [call] = out.choices[0].message.tool_calls
            assert call.function.name == name
            assert out.choices[0].finish_reason == "tool_calls"


def test_stream_deltas_add_up_to_the_answer(server: ServerProcess) -> None:
    with server.openai() as client:
        whole = ask(client, tool_choice="required").choices[0].message.tool_calls[0]
        chunks = list(ask(client, tool_choice="required", stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish == ["tool_calls"]
    first, rest = deltas[0].tool_calls[0], [d.tool_calls[0] for d in deltas[1:]]
    # id, type and name in the first fragment only; argument text after
    assert first.index == 0 and first.id and first.type == "function"
    assert first.function.name == whole.function.name
    assert all(d.index == 0 and d.id is None and d.function.name is None for d in rest)
    arguments = (first.function.arguments or "") + "".join(d.function.arguments for d in rest)
    assert json.loads(arguments) == json.loads(whole.function.arguments)
    assert not any(c.choices[0].delta.content for c in chunks if c.choices)


def test_two_turn_tool_loop_renders(server: ServerProcess) -> None:
    """The call the server made, sent back with its result, is a valid next turn."""
    with server.openai() as client:
        first = ask(client, tool_choice={"type": "function", "function": {"name": "get_weather"}})
        call = first.choices[0].message.tool_calls[0]
        messages = [
            *USER,
            first.choices[0].message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": "22 degrees"},
        ]
        second = client.chat.completions.create(
            model="tiny", messages=messages, tools=TOOLS, tool_choice="none", max_tokens=4
        )
    assert second.choices[0].finish_reason == "length"
    assert second.choices[0].message.tool_calls is None
    assert isinstance(second.choices[0].message.content, str)


def test_legacy_functions(server: ServerProcess) -> None:
    with server.http() as http:
        body = {
            "messages": USER,
            "functions": [WEATHER["function"]],
            "function_call": {"name": "get_weather"},
            "max_tokens": 400,
            "temperature": 0,
        }
        out = http.post("/v1/chat/completions", json=body).json()
    choice = out["choices"][0]
    assert choice["finish_reason"] == "function_call"
    assert choice["message"]["function_call"]["name"] == "get_weather"
    assert "tool_calls" not in choice["message"]
    assert json.loads(choice["message"]["function_call"]["arguments"])["unit"] in {"c", "f"}


def test_bad_tool_requests_are_400s(server: ServerProcess) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": None, "tool_choice": "required"}, "tool_choice"),
        ({"tool_choice": "required", "grammar": 'root ::= "x"'}, "grammar"),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools"),
        ({"functions": [WEATHER["function"]]}, "functions"),  # beside tools
    ]
    with server.http() as http:
        for extra, param in cases:
            body = {"messages": USER, "tools": TOOLS, "max_tokens": 4} | extra
            body = {k: v for k, v in body.items() if v is not None}
            r = http.post("/v1/chat/completions", json=body)
            assert r.status_code == 400, (extra, r.text)
            error = r.json()["error"]
            assert error["type"] == "invalid_request_error"
            assert param in (error.get("param") or ""), (extra, error)
        assert http.get("/health").status_code == 200


def test_no_tools_stays_plain(server: ServerProcess) -> None:
    with server.openai() as client:
        out = client.chat.completions.create(
            model="tiny", messages=USER, max_tokens=8, temperature=0
        )
    assert out.choices[0].finish_reason == "length"
    assert out.choices[0].message.tool_calls is None


def test_builtin_template_refuses_tools(tiny_model_path: Path) -> None:
    with start_server(tiny_model_path, "-c", "1024", "--chat-template", "llama2") as s:
        with s.openai() as client, pytest.raises(openai.BadRequestError) as e:
            ask(client, model="x")
    assert "template" in str(e.value.body)


def test_ollama_chat_takes_tools_and_tool_turns(server: ServerProcess) -> None:
    """Ollama's calls carry no ids; the server gives them ones every template takes back."""
    messages = [
        *USER,
        {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "get_weather", "arguments": {"unit": "c"}}}]},
        {"role": "tool", "content": "22 degrees", "tool_name": "get_weather"},
    ]  # fmt: skip
    body = {"messages": messages, "tools": TOOLS, "stream": False, "options": {"num_predict": 4}}
    with server.http() as http:
        r = http.post("/api/chat", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["done"] is True and isinstance(out["message"]["content"], str)


def test_props_show_the_templates_caps(server: ServerProcess) -> None:
    with server.http() as http:
        caps = http.get("/props").json()["chat_template_caps"]
    assert caps["supports_tools"] is True and caps["supports_tool_calls"] is True
    assert isinstance(caps["supports_thinking"], bool)
