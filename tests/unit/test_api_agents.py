"""The Responses and Messages APIs on the wire, over the replaying fake engine: how their
requests become chat messages and sampling, and the shapes of their answers and events. Tool
calls need the real parser: tests/integration/test_server_agents.py."""

from __future__ import annotations

import json
from typing import Any

import pytest
from tests.unit.fake_engine import PROMPT_TOKENS, client, make_app, reply

pytestmark = pytest.mark.unit


def named_events(body: str) -> list[tuple[str, dict[str, Any]]]:
    """(name, payload) of each ``event: NAME\\ndata: JSON`` of an SSE body."""
    assert body.endswith("\n\n")
    out = []
    for block in body[:-2].split("\n\n"):
        name_line, data_line = block.split("\n")
        assert name_line.startswith("event: ") and data_line.startswith("data: "), block
        out.append((name_line[7:], json.loads(data_line[6:])))
    return out


IMAGE = {"type": "input_image", "image_url": "data:x"}
TEXT_22 = {"type": "text", "text": "22"}
TOOL_USE = {"type": "tool_use", "id": "1", "name": "f", "input": {}}


def text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text}


def input_text(text: str) -> dict[str, Any]:
    return {"type": "input_text", "text": text}


def call_item(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"type": "function_call", "call_id": call_id, "name": name, "arguments": arguments}


def user_blocks(*blocks: dict[str, Any]) -> dict[str, Any]:
    return {"role": "user", "content": list(blocks)}


# ---- Responses ----


async def test_responses_input_items_become_chat_messages() -> None:
    app, engine = make_app()
    body = {
        "instructions": "Be brief.",
        "input": [
            {"role": "user", "content": "Weather?"},
            {"type": "message", "role": "assistant", "content": [text_part("Let me see.")]},
            call_item("c1", "get_weather", '{"unit": "c"}'),
            call_item("c2", "get_time", "{}"),
            {"type": "function_call_output", "call_id": "c1", "output": "22"},
            {"type": "function_call_output", "call_id": "c2", "output": [input_text("noon")]},
            {"type": "reasoning", "summary": []},
        ],
        "max_output_tokens": 9,
        "temperature": 0.5,
    }  # fmt: skip
    async with client(app) as c:
        r = await c.post("/v1/responses", json=body)
    assert r.status_code == 200, r.text
    [inputs] = engine.chat_inputs
    calls = inputs["messages"][2]["tool_calls"]
    assert [m["role"] for m in inputs["messages"]] == [
        "system",
        "user",
        "assistant",
        "tool",
        "tool",
    ]
    assert inputs["messages"][2]["content"] == "Let me see."  # the two calls join its turn
    assert [c["id"] for c in calls] == ["c1", "c2"]
    assert calls[0]["function"] == {"name": "get_weather", "arguments": '{"unit": "c"}'}
    assert inputs["messages"][4] == {"role": "tool", "content": "noon", "tool_call_id": "c2"}
    request = engine.requests[0]
    assert request.max_tokens == 9 and request.sampling.temperature == 0.5


async def test_responses_answer_shape() -> None:
    app, engine = make_app()
    engine.outputs = reply("Hi there", cached_tokens=2)
    async with client(app) as c:
        r = (await c.post("/v1/responses", json={"input": "Hello", "metadata": {"k": "v"}})).json()
    assert r["object"] == "response" and r["id"].startswith("resp_")
    assert r["status"] == "completed" and r["incomplete_details"] is None
    [item] = r["output"]
    assert item["type"] == "message" and item["role"] == "assistant"
    assert item["content"][0] == {
        "text": "Hi there",
        "type": "output_text",
        "annotations": [],
        "logprobs": [],
    }
    assert r["usage"]["input_tokens"] == PROMPT_TOKENS
    assert r["usage"]["input_tokens_details"] == {"cached_tokens": 2}
    assert r["usage"]["output_tokens"] == 8 and r["metadata"] == {"k": "v"}


async def test_responses_stream_events() -> None:
    app, engine = make_app()
    engine.outputs = reply("Hey", "length")
    async with client(app) as c:
        r = await c.post("/v1/responses", json={"input": "Hello", "stream": True})
    events = named_events(r.text)
    names = [n for n, _ in events]
    assert names == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added", *["response.output_text.delta"] * 3,
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.incomplete",
    ]  # fmt: skip
    assert [p["sequence_number"] for _, p in events] == list(range(len(events)))
    assert all(p["type"] == n for n, p in events)
    assert "".join(p["delta"] for n, p in events if n.endswith(".delta")) == "Hey"
    final = events[-1][1]["response"]
    assert final["status"] == "incomplete"
    assert final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["output"][0]["content"][0]["text"] == "Hey"


async def test_responses_format_and_reasoning_map() -> None:
    app, engine = make_app()
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    body = {
        "input": "x",
        "text": {"format": {"type": "json_schema", "name": "a", "schema": schema}},
        "reasoning": {"effort": "none"},
    }
    async with client(app) as c:
        assert (await c.post("/v1/responses", json=body)).status_code == 200
    assert json.loads(engine.requests[0].sampling.json_schema or "") == schema
    assert engine.chat_inputs[0]["enable_thinking"] is False


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"tools": [{"type": "web_search"}]}, "tools[0]"),
        ({"input": [{"role": "user", "content": [IMAGE]}]}, "input[0].content[0]"),
        ({"input": [{"type": "function_call", "name": "f"}]}, "input[0]"),
        ({"input": [{"type": "reasoning", "summary": []}]}, "input"),
        ({"input": []}, "input"),
    ],
)  # fmt: skip
async def test_responses_bad_requests(extra: dict[str, Any], param: str) -> None:
    app, engine = make_app()
    async with client(app) as c:
        r = await c.post("/v1/responses", json={"input": "x"} | extra)
    assert r.status_code == 400, r.text
    assert param in (r.json()["error"]["param"] or ""), r.json()
    assert not engine.calls


# ---- Messages ----


async def test_messages_blocks_become_chat_messages() -> None:
    app, engine = make_app()
    body = {
        "max_tokens": 5,
        "system": [{"type": "text", "text": "Be brief."}],
        "messages": [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "Need the tool.", "signature": "s"},
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "t1", "name": "get_weather", "input": {"unit": "c"}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "t1", "content": [TEXT_22]},
                {"type": "text", "text": "Thanks"},
            ]},
        ],
        "stop_sequences": ["END"],
        "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "thinking": {"type": "disabled"},
        "top_k": 3,
    }  # fmt: skip
    async with client(app) as c:
        r = await c.post("/v1/messages", json=body)
    assert r.status_code == 200, r.text
    [inputs] = engine.chat_inputs
    msgs = inputs["messages"]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "tool", "user"]
    assert msgs[2]["content"] == "Checking." and msgs[2]["reasoning_content"] == "Need the tool."
    assert json.loads(msgs[2]["tool_calls"][0]["function"]["arguments"]) == {"unit": "c"}
    assert msgs[3] == {"role": "tool", "content": "22", "tool_call_id": "t1"}
    assert inputs["tool_choice"] == "required" and inputs["parallel_tool_calls"] is False
    assert inputs["tools"][0]["function"]["name"] == "get_weather"
    assert inputs["enable_thinking"] is False
    request = engine.requests[0]
    assert "END" in request.stop and request.max_tokens == 5 and request.sampling.top_k == 3


@pytest.mark.parametrize(
    ("finish", "stop_word", "stop_reason"),
    [("stop", None, "end_turn"), ("stop", "END", "stop_sequence"), ("length", None, "max_tokens")],
)
async def test_messages_answer_and_stop_reasons(
    finish: Any, stop_word: str | None, stop_reason: str
) -> None:
    app, engine = make_app()
    engine.outputs = reply("Hi", finish, stop_word=stop_word, cached_tokens=3)
    body = {"max_tokens": 5, "messages": [{"role": "user", "content": "Hello"}]}
    async with client(app) as c:
        r = (await c.post("/v1/messages", json=body)).json()
    assert r["type"] == "message" and r["role"] == "assistant" and r["id"].startswith("msg_")
    assert r["content"] == [{"text": "Hi", "type": "text"}]
    assert r["stop_reason"] == stop_reason and r["stop_sequence"] == stop_word
    assert r["usage"]["input_tokens"] == PROMPT_TOKENS - 3
    assert r["usage"]["cache_read_input_tokens"] == 3 and r["usage"]["output_tokens"] == 2


async def test_messages_stream_events() -> None:
    app, engine = make_app()
    engine.outputs = reply("Hey")
    body = {"max_tokens": 5, "messages": [{"role": "user", "content": "Hello"}], "stream": True}
    async with client(app) as c:
        r = await c.post("/v1/messages", json=body)
    events = named_events(r.text)
    assert [n for n, _ in events] == [
        "message_start", "content_block_start", *["content_block_delta"] * 3,
        "content_block_stop", "message_delta", "message_stop",
    ]  # fmt: skip
    assert events[0][1]["message"]["content"] == []
    start = {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"text": "", "type": "text"},
    }
    assert events[1][1] == start
    assert "".join(p["delta"]["text"] for n, p in events if n == "content_block_delta") == "Hey"
    assert events[-2][1]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert events[-2][1]["usage"]["output_tokens"] == 3


async def test_count_tokens() -> None:
    app, engine = make_app()
    body = {"messages": [{"role": "user", "content": "Hello"}], "system": "Be brief."}
    async with client(app) as c:
        r = await c.post("/v1/messages/count_tokens", json=body)
    assert r.status_code == 200
    assert r.json()["input_tokens"] == len(await engine.tokenize(engine_prompt(engine)))
    assert not engine.calls  # counted, not generated


def engine_prompt(engine: Any) -> str:
    from tests.unit.fake_engine import rendered

    return rendered(engine.chat_inputs[-1]["messages"])


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"max_tokens": None}, "max_tokens"),
        ({"messages": [user_blocks({"type": "image", "source": {}})]}, "messages[0].content[0]"),
        ({"messages": [user_blocks(TOOL_USE)]}, "messages[0].content[0]"),
        ({"tools": [{"name": "web", "type": "web_search_20250305"}]}, "tools[0]"),
        ({"tool_choice": {"type": "tool"}}, "tool_choice"),
    ],
)  # fmt: skip
async def test_messages_bad_requests(extra: dict[str, Any], param: str) -> None:
    app, engine = make_app()
    body = {"max_tokens": 5, "messages": [{"role": "user", "content": "x"}]} | extra
    async with client(app) as c:
        r = await c.post("/v1/messages", json={k: v for k, v in body.items() if v is not None})
    assert r.status_code == 400, r.text
    assert param in (r.json()["error"]["param"] or ""), r.json()
    assert not engine.calls


# ---- Ollama's /api/chat with tools (the fake parser: "CALL name {json}" lines) ----

OLLAMA_TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]


async def test_ollama_tool_calls_whole_and_streamed() -> None:
    app, engine = make_app()
    answer = '<think>Use the tool.</think>Checking.\nCALL get_weather {"unit": "c"}'
    engine.outputs = reply(answer)
    body: dict[str, Any] = {
        "messages": [{"role": "user", "content": "Weather?"}],
        "tools": OLLAMA_TOOLS,
        "stream": False,
    }
    async with client(app) as c:
        whole = (await c.post("/api/chat", json=body)).json()
        streamed = await c.post("/api/chat", json=body | {"stream": True})
    message = whole["message"]
    assert message["content"] == "Checking." and message["thinking"] == "Use the tool."
    call = {"function": {"name": "get_weather", "arguments": {"unit": "c"}, "index": 0}}
    assert message["tool_calls"] == [call | {"id": "id0000000"}]
    assert whole["done"] is True and whole["done_reason"] == "stop"
    lines = [json.loads(line) for line in streamed.text.splitlines()]
    assert lines[-1]["done"] is True
    assert [
        line["message"].get("tool_calls") for line in lines if line["message"].get("tool_calls")
    ] == [message["tool_calls"]]
    assert "".join(line["message"].get("thinking", "") for line in lines) == "Use the tool."
    assert "".join(line["message"]["content"] for line in lines) == "Checking."


async def test_ollama_tool_turns_become_chat_messages() -> None:
    app, engine = make_app()
    body = {
        "messages": [
            {"role": "user", "content": "Weather?"},
            {
                "role": "assistant",
                "content": "",
                "thinking": "Need it.",
                "tool_calls": [
                    {"function": {"name": "get_weather", "arguments": {"unit": "c"}}},
                    {"function": {"name": "get_time", "arguments": {}}},
                ],
            },
            {"role": "tool", "content": "22", "tool_name": "get_weather"},
            {"role": "tool", "content": "noon", "tool_name": "get_time"},
        ],
        "tools": OLLAMA_TOOLS,
        "think": False,
        "stream": False,
    }
    async with client(app) as c:
        assert (await c.post("/api/chat", json=body)).status_code == 200
    [inputs] = engine.chat_inputs
    assistant, weather, clock = inputs["messages"][1:]
    assert assistant["content"] is None and assistant["reasoning_content"] == "Need it."
    ids = [call["id"] for call in assistant["tool_calls"]]
    assert ids == ["call00000", "call00001"]
    assert json.loads(assistant["tool_calls"][0]["function"]["arguments"]) == {"unit": "c"}
    assert (weather["tool_call_id"], weather["name"]) == ("call00000", "get_weather")
    assert (clock["tool_call_id"], clock["name"]) == ("call00001", "get_time")
    assert inputs["enable_thinking"] is False


async def test_chat_completion_tool_calls_wire_shape() -> None:
    app, engine = make_app()
    engine.outputs = reply('CALL get_weather {"unit": "c"}')
    body = {"messages": [{"role": "user", "content": "x"}], "tools": OLLAMA_TOOLS}
    async with client(app) as c:
        r = (await c.post("/v1/chat/completions", json=body)).json()
    choice = r["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    assert choice["message"]["tool_calls"] == [
        {"id": "id0000000", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"unit": "c"}'}}
    ]  # fmt: skip
