"""The Responses API (the official openai SDK's ``responses`` client) and Anthropic's Messages
API (the ``anthropic`` SDK) on a real server: a tiny random model with Qwen 2.5's template, the
calls forced (see test_server_tools.py for why), streamed and not, with the SDKs' own stream
helpers putting the events together."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import pytest

from tests.fixtures.chat import UNIT_SCHEMA, family_model
from tests.integration.server_fixtures import ServerProcess, start_server

pytestmark = pytest.mark.integration

SCHEMA = UNIT_SCHEMA
RESPONSES_TOOLS: Any = [{"type": "function", "name": "get_weather", "parameters": SCHEMA}]
ANTHROPIC_TOOLS: Any = [{"name": "get_weather", "input_schema": SCHEMA}]
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    path = tmp_path_factory.mktemp("agents") / "qwen-template.gguf"
    model = family_model(path, "Qwen-Qwen2.5-7B-Instruct.jinja")
    with start_server(model, "-np", "2", "-c", "4096", "-a", "tiny") as s:
        yield s


def claude(server: ServerProcess) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.base_url, api_key="none", max_retries=0)


# ---- Responses ----


def test_responses_function_call(server: ServerProcess) -> None:
    with server.openai() as client:
        out = client.responses.create(
            model="tiny",
            input="Weather?",
            tools=RESPONSES_TOOLS,
            tool_choice="required",
            parallel_tool_calls=False,
            extra_body=GREEDY,
        )
    assert out.status == "completed"
    [call] = out.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert json.loads(call.arguments)["unit"] in {"c", "f"}
    assert out.usage is not None and out.usage.output_tokens > 0


def test_responses_stream_helper(server: ServerProcess) -> None:
    with server.openai() as client:
        whole = client.responses.create(
            model="tiny", input="Weather?", tools=RESPONSES_TOOLS, tool_choice="required",
            parallel_tool_calls=False, extra_body=GREEDY,
        )  # fmt: skip
        with client.responses.stream(
            model="tiny", input="Weather?", tools=RESPONSES_TOOLS, tool_choice="required",
            parallel_tool_calls=False, extra_body=GREEDY,
        ) as stream:  # fmt: skip
            types = [event.type for event in stream]
            final = stream.get_final_response()
    assert types[0] == "response.created" and types[-1] == "response.completed"
    assert "response.function_call_arguments.delta" in types
    [call] = final.output
    assert call.type == "function_call"
    assert whole.output[0].type == "function_call"
    assert (call.name, call.arguments) == (whole.output[0].name, whole.output[0].arguments)


def test_responses_tool_loop_input(server: ServerProcess) -> None:
    """Output items sent back as input, with the function's output: a valid next request."""
    with server.openai() as client:
        first = client.responses.create(
            model="tiny", input="Weather?", tools=RESPONSES_TOOLS, tool_choice="required",
            extra_body=GREEDY,
        )  # fmt: skip
        call = first.output[0]
        assert call.type == "function_call"
        items: Any = [
            {"role": "user", "content": "Weather?"},
            call.model_dump(exclude_none=True),
            {"type": "function_call_output", "call_id": call.call_id, "output": "22"},
        ]
        second = client.responses.create(
            model="tiny", input=items, tools=RESPONSES_TOOLS, tool_choice="none",
            max_output_tokens=4, extra_body=GREEDY,
        )  # fmt: skip
    assert second.status == "incomplete"
    assert second.incomplete_details is not None
    assert second.incomplete_details.reason == "max_output_tokens"
    assert second.output[0].type == "message"


# ---- Messages ----


def test_messages_tool_use(server: ServerProcess) -> None:
    out = claude(server).messages.create(
        model="tiny",
        max_tokens=400,
        messages=[{"role": "user", "content": "Weather?"}],
        tools=ANTHROPIC_TOOLS,
        tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
        extra_body=GREEDY,
    )
    assert out.stop_reason == "tool_use"
    [block] = out.content
    assert block.type == "tool_use" and block.name == "get_weather"
    assert block.input in ({"unit": "c"}, {"unit": "f"})


def test_messages_stream_helper(server: ServerProcess) -> None:
    args: Any = {
        "model": "tiny",
        "max_tokens": 400,
        "messages": [{"role": "user", "content": "Weather?"}],
        "tools": ANTHROPIC_TOOLS,
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "extra_body": GREEDY,
    }
    client = claude(server)
    whole = client.messages.create(**args)
    with client.messages.stream(**args) as stream:
        types = [event.type for event in stream]
        final = stream.get_final_message()
    assert types[0] == "message_start" and types[-1] == "message_stop"
    assert final.stop_reason == "tool_use"
    [block] = final.content
    assert block.type == "tool_use" and whole.content[0].type == "tool_use"
    assert block.input == whole.content[0].input


def test_messages_tool_result_turn_and_count(server: ServerProcess) -> None:
    client = claude(server)
    first = client.messages.create(
        model="tiny", max_tokens=400, messages=[{"role": "user", "content": "Weather?"}],
        tools=ANTHROPIC_TOOLS, tool_choice={"type": "any"}, extra_body=GREEDY,
    )  # fmt: skip
    use = first.content[-1]
    assert use.type == "tool_use"
    turns: Any = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": [use.model_dump(exclude_none=True)]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "22"}],
        },
    ]
    second = client.messages.create(
        model="tiny", max_tokens=3, messages=turns, tools=ANTHROPIC_TOOLS, extra_body=GREEDY
    )
    assert second.stop_reason == "max_tokens"
    with_tools = client.messages.count_tokens(model="tiny", messages=turns, tools=ANTHROPIC_TOOLS)
    without = client.messages.count_tokens(model="tiny", messages=turns[:1])
    assert with_tools.input_tokens > without.input_tokens > 0


def test_messages_errors(server: ServerProcess) -> None:
    client = claude(server)
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(
            model="tiny", max_tokens=5, tools=ANTHROPIC_TOOLS,
            messages=[{"role": "user", "content": "x"}],
            tool_choice={"type": "tool", "name": "nope"},
        )  # fmt: skip
    with server.http() as http:
        r = http.post("/v1/messages", json={"messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
        assert http.get("/health").status_code == 200
