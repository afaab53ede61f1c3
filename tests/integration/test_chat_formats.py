"""Model families' chat formats through llama.cpp's common chat code: tools rendered into the
prompt, the grammar that forces a call, and the answer parsed back into content, reasoning and
tool calls, whole and streamed.

Each family is a tiny random model whose GGUF metadata carries the family's real template
(llama.cpp's ``models/templates``). The answers are written here in each family's format, so
what is checked is the parsing, not what a random model says.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from llamabox.engine import Engine
from llamabox.types import EngineConfig, InvalidRequestError
from tests.fixtures.chat import WEATHER_TOOL, family_model

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]

WEATHER = WEATHER_TOOL
USER = [{"role": "user", "content": "Weather in Paris?"}]

# family: (template file, an answer calling get_weather(unit="c"), its reasoning, its content)
ANSWERS: dict[str, tuple[str, str, str, str]] = {
    "qwen2.5": (
        "Qwen-Qwen2.5-7B-Instruct.jinja",
        'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"unit": "c"}}\n'
        "</tool_call>",
        "",
        "Let me look.",
    ),
    "hermes3": (
        "NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja",
        '<tool_call>\n{"name": "get_weather", "arguments": {"unit": "c"}}\n</tool_call>',
        "",
        "",
    ),
    "llama3.1": (
        "meta-llama-Llama-3.1-8B-Instruct.jinja",
        '{"name": "get_weather", "parameters": {"unit": "c"}}',
        "",
        "",
    ),
    "mistral-nemo": (
        "mistralai-Mistral-Nemo-Instruct-2407.jinja",
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"unit": "c"}, "id": "a1b2c3d4e"}]',
        "",
        "",
    ),
    "qwen3": (
        "Qwen-Qwen3-0.6B.jinja",
        "<think>\nThe user wants the weather.\n</think>\n\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"unit": "c"}}\n</tool_call>',
        "The user wants the weather.",
        "",
    ),
    "deepseek-r1": (
        "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja",
        "Paris, so Celsius.\n</think>\n\n<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function"
        '<｜tool▁sep｜>get_weather\n```json\n{"unit": "c"}\n```<｜tool▁call▁end｜>'
        "<｜tool▁calls▁end｜>",
        "Paris, so Celsius.",
        "",
    ),
    "gpt-oss": (
        "openai-gpt-oss-120b.jinja",
        "<|channel|>analysis<|message|>Weather in Paris.<|end|><|start|>assistant<|channel|>"
        'commentary to=functions.get_weather <|constrain|>json<|message|>{"unit":"c"}<|call|>',
        "Weather in Paris.",
        "",
    ),
}


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def engines(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[dict[str, Engine]]:
    tmp = tmp_path_factory.mktemp("families")
    out: dict[str, Engine] = {}
    try:
        for family in ANSWERS:
            engine = Engine(
                EngineConfig(
                    model=str(family_model(tmp / f"{family}.gguf", ANSWERS[family][0])),
                    n_ctx=1024,
                    n_parallel=1,
                )
            )
            await engine.start()
            out[family] = engine
        yield out
    finally:
        for engine in out.values():
            await engine.stop()


def parsed(engine: Engine, render: Any, answer: str, step: int) -> tuple[dict[str, Any], Any]:
    """The answer pushed ``step`` characters at a time: the deltas put together, and the
    parser's final message."""
    parser = engine.chat_parser(render)
    joined: dict[str, Any] = {"reasoning": "", "content": "", "calls": {}}
    pieces = [answer[i : i + step] for i in range(0, len(answer), step)]
    for k, piece in enumerate(pieces):
        for d in parser.push(piece, k == len(pieces) - 1):
            joined["reasoning"] += d.reasoning
            joined["content"] += d.content
            if d.tool_index >= 0:
                call = joined["calls"].setdefault(d.tool_index, {"id": d.tool_id, "name": ""})
                assert call["id"] == d.tool_id or not d.tool_id, "an id changed mid-stream"
                call["name"] += d.tool_name
                call["arguments"] = call.get("arguments", "") + d.tool_arguments
    return joined, parser.message


@pytest.mark.parametrize("family", list(ANSWERS))
@pytest.mark.parametrize("step", [1, 7, 10_000])
async def test_answer_parsed_whole_and_streamed(
    engines: dict[str, Engine], family: str, step: int
) -> None:
    engine = engines[family]
    _, answer, reasoning, content = ANSWERS[family]
    render = await engine.apply_chat({"messages": USER, "tools": [WEATHER]})
    assert render.parses and render.parse_tool_calls
    joined, message = parsed(engine, render, answer, step)
    assert message.reasoning_content.strip() == reasoning
    assert message.content.strip() == content
    [call] = message.tool_calls
    assert call.name == "get_weather"
    assert json.loads(call.arguments) == {"unit": "c"}
    assert re.fullmatch(r"[A-Za-z0-9]{9}", call.id)  # what Mistral's template takes back
    # The deltas add up to the message: the id and name once, in the call's first piece.
    assert joined["reasoning"] == message.reasoning_content
    assert joined["content"] == message.content
    assert joined["calls"] == {0: {"id": call.id, "name": call.name, "arguments": call.arguments}}


@pytest.mark.parametrize("family", list(ANSWERS))
async def test_tool_choice_grammars(engines: dict[str, Engine], family: str) -> None:
    engine = engines[family]
    auto = await engine.apply_chat({"messages": USER, "tools": [WEATHER]})
    required = await engine.apply_chat(
        {"messages": USER, "tools": [WEATHER], "tool_choice": "required"}
    )
    none = await engine.apply_chat({"messages": USER, "tools": [WEATHER], "tool_choice": "none"})
    assert "get_weather" in required.grammar and not required.grammar_lazy
    root = next(line for line in required.grammar.splitlines() if line.startswith("root ::="))
    # "required" leaves no free text before the calls (a reasoning section may come first).
    assert not re.search(r"until-\d+\?\s+tool-calls?\s*$", root), root
    if auto.grammar:  # a lazy grammar waits for the format's own start of a call
        assert auto.grammar_lazy and auto.grammar_triggers
    assert not none.grammar and not none.parse_tool_calls
    if family != "deepseek-r1":  # its template parses calls but never describes the tools
        assert "get_weather" in auto.prompt


async def test_single_call_unless_parallel(engines: dict[str, Engine]) -> None:
    engine = engines["qwen2.5"]
    one = await engine.apply_chat(
        {
            "messages": USER,
            "tools": [WEATHER],
            "tool_choice": "required",
            "parallel_tool_calls": False,
        }
    )
    many = await engine.apply_chat(
        {
            "messages": USER,
            "tools": [WEATHER],
            "tool_choice": "required",
            "parallel_tool_calls": True,
        }
    )
    assert "tool-calls ::= tool-call space" in one.grammar
    assert "(tool-call space)+" in many.grammar
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"unit": "c"}}\n</tool_call>\n'
    _, message = parsed(engine, one, call * 2, 10_000)
    assert len(message.tool_calls) == 1
    _, message = parsed(engine, many, call * 2, 10_000)
    assert len(message.tool_calls) == 2
    assert message.tool_calls[0].id != message.tool_calls[1].id


@pytest.mark.parametrize("family", list(ANSWERS))
async def test_tool_turns_round_trip(engines: dict[str, Engine], family: str) -> None:
    """An assistant turn holding a call (content null) and the tool's answer reach the prompt."""
    messages = [
        *USER,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "abcDEF123",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"unit": "c"}'},
                }
            ],
        },
        {
            "role": "tool",
            "tool_call_id": "abcDEF123",
            "name": "get_weather",
            "content": "22 degrees",
        },
    ]
    render = await engines[family].apply_chat({"messages": messages, "tools": [WEATHER]})
    assert "22 degrees" in render.prompt
    described = 0 if family == "deepseek-r1" else 1
    assert render.prompt.count("get_weather") >= 1 + described  # called in the history


async def test_reasoning_split_and_kept(engines: dict[str, Engine]) -> None:
    engine = engines["deepseek-r1"]
    answer = "Two and two.\n</think>\n\nThe answer is 4."
    split = await engine.apply_chat({"messages": USER})
    assert split.parses and split.supports_thinking
    _, message = parsed(engine, split, answer, 3)
    assert message.reasoning_content.strip() == "Two and two."
    assert message.content.strip() == "The answer is 4."
    kept = await engine.apply_chat({"messages": USER, "reasoning_format": "none"})
    assert not kept.parses  # the answer is returned as the model wrote it


async def test_enable_thinking_false(engines: dict[str, Engine]) -> None:
    engine = engines["qwen3"]
    assert engine.model_info.chat_template_caps["supports_thinking"] is True
    assert engines["qwen2.5"].model_info.chat_template_caps["supports_thinking"] is False
    thinking = await engine.apply_chat({"messages": USER})
    plain = await engine.apply_chat({"messages": USER, "enable_thinking": False})
    assert "<think>" not in thinking.prompt.split("assistant")[-1]
    assert "<think>\n\n</think>" in plain.prompt  # Qwen3's template closes the section itself


async def test_chat_inputs_refused(engines: dict[str, Engine]) -> None:
    engine = engines["qwen2.5"]
    bad: list[tuple[dict[str, Any], str]] = [
        ({"messages": USER, "tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
        ({"messages": USER, "reasoning_format": "verbose"}, "reasoning_format"),
        ({"messages": USER, "tools": [{"type": "function"}]}, "tools"),
        ({"messages": USER, "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
        ({"messages": [{"role": "assistant", "tool_calls": [{"type": "function"}]}]}, "messages"),
    ]
    for inputs, param in bad:
        with pytest.raises(InvalidRequestError) as e:
            await engine.apply_chat(inputs)
        assert e.value.param == param, inputs


async def test_builtin_template_refuses_tools(tiny_model_path: Path) -> None:
    engine = Engine(EngineConfig(model=str(tiny_model_path), n_ctx=512, chat_template="llama2"))
    await engine.start()
    try:
        render = await engine.apply_chat({"messages": USER})
        assert "Weather in Paris?" in render.prompt and not render.parses
        with pytest.raises(InvalidRequestError) as e:
            await engine.apply_chat({"messages": USER, "tools": [WEATHER]})
        assert e.value.param == "tools"
    finally:
        await engine.stop()
