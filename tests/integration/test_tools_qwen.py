"""A two-turn tool loop on a real model, Qwen2.5-Coder 0.5B Instruct, with the openai SDK:
the call (forced, streamed and not), the tool's result sent back, the final answer. Runs with
``--run-qwen`` (``pip install '.[qwen]'``).

The first turn forces the call (``tool_choice: "required"``): under ``auto`` this model writes
the call as a bare JSON object instead of its template's ``<tool_call>`` format, which comes back
as content (as from llama-server). Nothing here asserts the model's words.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.server_fixtures import ServerProcess, start_server

pytestmark = [pytest.mark.integration, pytest.mark.qwen]

TOOLS: Any = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "City name"}},
                "required": ["city"],
            },
        },
    }
]
MESSAGES: Any = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the weather like in Paris right now?"},
]
RESULT = json.dumps({"city": "Paris", "temperature_c": 22, "sky": "sunny"})


@pytest.fixture(scope="module")
def qwen() -> Iterator[ServerProcess]:
    from llamabox.models import qwen_draft_path

    with start_server(qwen_draft_path(progress=False), "-c", "4096", "-np", "2", "-a", "qwen") as s:
        yield s


def second_turn(call: Any) -> list[Any]:
    return [
        *MESSAGES,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": call.function.arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call.id, "content": RESULT},
    ]


@pytest.mark.parametrize("stream", [False, True])
def test_tool_loop(qwen: ServerProcess, stream: bool) -> None:
    with qwen.openai() as client:
        args: Any = {"model": "qwen", "tools": TOOLS, "temperature": 0, "max_tokens": 200}
        if stream:
            chunks = list(
                client.chat.completions.create(
                    messages=MESSAGES, tool_choice="required", stream=True, **args
                )
            )
            parts = [
                c.choices[0].delta.tool_calls[0]
                for c in chunks
                if c.choices and c.choices[0].delta.tool_calls
            ]
            finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
            assert parts[0].id and parts[0].function.name == "get_weather"
            arguments = "".join(p.function.arguments or "" for p in parts)
            call: Any = parts[0].model_copy(deep=True)
            call.function.arguments = arguments
        else:
            out = client.chat.completions.create(messages=MESSAGES, tool_choice="required", **args)
            finish = out.choices[0].finish_reason
            [call] = out.choices[0].message.tool_calls
        assert finish == "tool_calls"
        assert call.function.name == "get_weather"
        city = json.loads(call.function.arguments)["city"]
        assert isinstance(city, str) and city.strip()

        final = client.chat.completions.create(messages=second_turn(call), **args)
    answer = final.choices[0]
    assert answer.finish_reason == "stop"
    assert answer.message.tool_calls is None
    assert answer.message.content and answer.message.content.strip()


def test_responses_tool_loop(qwen: ServerProcess) -> None:
    tools: Any = [{"type": "function", **TOOLS[0]["function"]}]
    with qwen.openai() as client:
        first = client.responses.create(
            model="qwen", input=MESSAGES[1]["content"], instructions=MESSAGES[0]["content"],
            tools=tools, tool_choice="required", extra_body={"temperature": 0},
        )  # fmt: skip
        [call] = first.output
        assert call.type == "function_call" and call.name == "get_weather"
        items: Any = [
            {"role": "user", "content": MESSAGES[1]["content"]},
            call.model_dump(exclude_none=True),
            {"type": "function_call_output", "call_id": call.call_id, "output": RESULT},
        ]
        with client.responses.stream(
            model="qwen", input=items, tools=tools, max_output_tokens=200,
            extra_body={"temperature": 0},
        ) as stream:  # fmt: skip
            final = stream.get_final_response()
    assert final.status == "completed"
    assert final.output_text.strip()


def test_messages_tool_loop(qwen: ServerProcess) -> None:
    import anthropic

    client = anthropic.Anthropic(base_url=qwen.base_url, api_key="none", max_retries=0)
    tools: Any = [
        {"name": t["function"]["name"], "description": t["function"]["description"],
         "input_schema": t["function"]["parameters"]}
        for t in TOOLS
    ]  # fmt: skip
    ask: Any = {"role": "user", "content": MESSAGES[1]["content"]}
    with client.messages.stream(
        model="qwen", max_tokens=200, system=MESSAGES[0]["content"], messages=[ask],
        tools=tools, tool_choice={"type": "any"}, extra_body={"temperature": 0},
    ) as stream:  # fmt: skip
        first = stream.get_final_message()
    assert first.stop_reason == "tool_use"
    use = first.content[-1]
    assert use.type == "tool_use" and use.name == "get_weather"
    assert isinstance(use.input, dict) and use.input.get("city")
    turns: Any = [
        ask,
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": use.id, "content": RESULT}],
        },
    ]
    final = client.messages.create(
        model="qwen", max_tokens=200, messages=turns, tools=tools, extra_body={"temperature": 0}
    )
    assert final.stop_reason in {"end_turn", "tool_use"}
    assert final.content
