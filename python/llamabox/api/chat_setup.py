"""Chat requests with tools and reasoning: rendered through the model's template (llama.cpp's
common chat code picks the model family's call format, grammar and parser), and the answer read
back into content, ``reasoning_content`` and ``tool_calls``, whole or as stream deltas.

``tool_choice: "required"`` and a named function are enforced by the template's grammar from the
first token; ``"auto"`` uses a lazy grammar that takes hold once the model starts a call.
"""

from __future__ import annotations

from typing import Any

import msgspec

from llamabox.api.http import Request
from llamabox.api.media import chat_refs, load_media
from llamabox.api.protocol import (
    AssistantMessage,
    ChatCompletionRequest,
    ChatFields,
    Delta,
    FunctionCall,
    FunctionCallDelta,
    FunctionDef,
    FunctionName,
    NamedToolChoice,
    Tool,
    ToolCall,
    ToolCallDelta,
)
from llamabox.api.serving import (
    check_n,
    generate_template,
    max_tokens_from,
    message_dicts,
    submit,
)
from llamabox.api.state import AppState, ChatParserLike, ChatRenderLike, RequestStreamLike
from llamabox.types import GenerateRequest, InvalidRequestError, SamplingParams, ToolGrammar

__all__ = [
    "AnswerReader",
    "ChatSetup",
    "answer_deltas",
    "prepare_chat",
    "setup_chat",
    "start_chat",
]


class ChatSetup:
    """A rendered chat: its prompt, the sampling it needs, and how to read its answers."""

    def __init__(
        self,
        render: ChatRenderLike,
        sampling: SamplingParams,
        legacy_functions: bool,
    ) -> None:
        self.render = render
        self.prompt = render.prompt
        self.sampling = sampling
        self.stops = list(render.additional_stops)
        self.legacy_functions = legacy_functions

    def reader(self, state: AppState) -> AnswerReader | None:
        """A reader for one choice's answer; None when the answer is plain content."""
        if not self.render.parses:
            return None
        return AnswerReader(state.engine.chat_parser(self.render), self.legacy_functions)


def _tools_and_choice(body: ChatFields) -> tuple[list[Tool], str, bool]:
    """The tools offered, the tool_choice as the template takes it (a named function becomes
    "required" with that function alone), and whether the legacy ``functions`` were used."""
    legacy = body.tools is None and body.functions is not None
    if body.tools is not None and body.functions is not None:
        raise InvalidRequestError("give tools or the legacy functions, not both", param="functions")
    tools = list(body.tools or [])
    choice: object = body.tool_choice
    if legacy:
        tools = [Tool(function=f) for f in body.functions or []]
        choice = body.function_call
    named: str | None = None
    if isinstance(choice, NamedToolChoice):
        named = choice.function.name
    elif isinstance(choice, FunctionName):
        named = choice.name
    param = "function_call" if legacy else "tool_choice"
    if named is not None:
        chosen = [t for t in tools if t.function.name == named]
        if not chosen:
            raise InvalidRequestError(
                f"{param} names the function '{named}', which is not among the "
                f"{'functions' if legacy else 'tools'}",
                param=param,
            )
        return chosen, "required", legacy
    if choice is None:
        return tools, "auto", legacy
    if choice == "required" and not tools:
        raise InvalidRequestError(f"{param} is 'required' but no tools are given", param=param)
    return tools, str(choice), legacy


def _tool_dict(tool: Tool) -> dict[str, Any]:
    fn: FunctionDef = tool.function
    out: dict[str, Any] = {"name": fn.name}
    if fn.description is not None:
        out["description"] = fn.description
    out["parameters"] = fn.parameters if fn.parameters is not None else {}
    return {"type": "function", "function": out}


async def setup_chat(
    state: AppState,
    body: ChatFields,
    messages: list[dict[str, Any]],
    sampling: SamplingParams,
    *,
    request_grammar: bool,
) -> ChatSetup:
    """Renders ``messages`` with the request's tools and reasoning settings. ``sampling`` is the
    request's (server defaults overlaid); with tools, the template's grammar takes the place of
    its grammar, and a JSON schema goes into the template's (``request_grammar``: the request
    gave a grammar of its own, which cannot be combined with tools)."""
    tools, choice, legacy = _tools_and_choice(body)
    inputs: dict[str, Any] = {"messages": messages, "add_generation_prompt": True}
    active = bool(tools) and choice != "none"
    if tools:
        inputs["tools"] = [_tool_dict(t) for t in tools]
        inputs["tool_choice"] = choice
        if body.parallel_tool_calls is not None:
            inputs["parallel_tool_calls"] = body.parallel_tool_calls
        elif legacy:
            inputs["parallel_tool_calls"] = False
    if active and request_grammar:
        raise InvalidRequestError("a grammar cannot be combined with tools", param="grammar")
    if active and sampling.json_schema:
        inputs["json_schema"] = msgspec.json.decode(sampling.json_schema)
    kwargs = dict(state.config.chat_template_kwargs)
    kwargs.update(body.chat_template_kwargs or {})
    enable_thinking = kwargs.get("enable_thinking")
    if enable_thinking is not None and not isinstance(enable_thinking, bool):
        raise InvalidRequestError(
            "chat_template_kwargs.enable_thinking must be true or false",
            param="chat_template_kwargs",
        )
    if body.reasoning_effort == "none":
        enable_thinking = False
        kwargs.pop("reasoning_effort", None)
    elif body.reasoning_effort is not None:
        kwargs["reasoning_effort"] = body.reasoning_effort
    if enable_thinking is not None:
        inputs["enable_thinking"] = enable_thinking
    if kwargs:
        inputs["chat_template_kwargs"] = kwargs
    inputs["reasoning_format"] = body.reasoning_format or state.config.reasoning_format
    render = await state.engine.apply_chat(inputs)
    if render.grammar:
        sampling = msgspec.structs.replace(
            sampling,
            grammar=None,
            json_schema=None,
            tool_grammar=ToolGrammar(
                grammar=render.grammar,
                lazy=render.grammar_lazy,
                triggers=[(int(t), str(v)) for t, v in render.grammar_triggers],
                preserved_tokens=list(render.preserved_tokens),
                generation_prompt=render.generation_prompt,
            ),
        )
    return ChatSetup(render, sampling, legacy)


class AnswerReader:
    """One choice's answer read back through the template's parser: stream deltas as text
    arrives, then the whole message."""

    def __init__(self, parser: ChatParserLike, legacy_functions: bool) -> None:
        self._parser = parser
        self._legacy = legacy_functions

    def push(self, text: str, final: bool = False) -> list[Delta]:
        if not text and not final:  # nothing new: spare the parser a pass over the answer
            return []
        out: list[Delta] = []
        for d in self._parser.push(text, final):
            if d.tool_index >= 0:
                fn = FunctionCallDelta(
                    name=d.tool_name or msgspec.UNSET, arguments=d.tool_arguments
                )
                if self._legacy:
                    if d.tool_index == 0:
                        out.append(Delta(function_call=fn))
                    continue
                call = ToolCallDelta(
                    index=d.tool_index,
                    id=d.tool_id or msgspec.UNSET,
                    type="function" if d.tool_id else msgspec.UNSET,
                    function=fn,
                )
                out.append(Delta(tool_calls=[call]))
            elif d.reasoning:
                out.append(Delta(reasoning_content=d.reasoning))
            elif d.content:
                out.append(Delta(content=d.content))
        return out

    @property
    def has_calls(self) -> bool:
        return bool(self._parser.message.tool_calls)

    def finish_reason(self, reason: str) -> str:
        """The wire finish_reason: a finished answer holding calls ends in them."""
        if reason == "stop" and self.has_calls:
            return "function_call" if self._legacy else "tool_calls"
        return reason

    def message(self) -> AssistantMessage:
        msg = self._parser.message
        calls = [
            ToolCall(id=c.id, function=FunctionCall(c.name, c.arguments)) for c in msg.tool_calls
        ]
        # Beside calls, a content of whitespace alone (the format's separators) is no content.
        content: str | None = msg.content
        if calls and not msg.content.strip():
            content = None
        out = AssistantMessage(content=content)
        if msg.reasoning_content:
            out.reasoning_content = msg.reasoning_content
        if calls and self._legacy:
            out.function_call = calls[0].function
        elif calls:
            out.tool_calls = calls
        return out


async def prepare_chat(
    req: Request, state: AppState, body: ChatCompletionRequest
) -> tuple[ChatSetup, GenerateRequest]:
    """A chat request rendered, and the generation request it makes (not submitted)."""
    check_n(state, body.n)
    template = await generate_template(
        state,
        body,
        req.request_id,
        max_tokens=max_tokens_from(
            ("max_completion_tokens", body.max_completion_tokens), ("max_tokens", body.max_tokens)
        ),
        logprobs=body.logprobs,
        n_probs=body.top_logprobs,
    )
    refs = chat_refs(body.messages)
    messages = message_dicts(body.messages, state.engine.media_marker if refs else None)
    media = await load_media(state, refs)
    chat = await setup_chat(
        state, body, messages, template.sampling, request_grammar=body.grammar is not None
    )
    template = msgspec.structs.replace(
        template,
        prompt=chat.prompt,
        media=media,
        sampling=chat.sampling,
        stop=[*template.stop, *chat.stops],
    )
    return chat, template


async def start_chat(
    req: Request, state: AppState, body: ChatCompletionRequest
) -> tuple[list[RequestStreamLike], list[AnswerReader | None], GenerateRequest]:
    """A chat request submitted: its ``n`` streams, a reader for each (None: plain content),
    and the request they were made from. The Responses and Messages APIs come here too."""
    chat, template = await prepare_chat(req, state, body)
    streams = await submit(state, [chat.prompt], template, body.n, headers=req.headers)
    return streams, [chat.reader(state) for _ in streams], template


def answer_deltas(reader: AnswerReader | None, text: str, final: bool) -> list[Delta]:
    """What one engine output adds to an answer: through the reader, or as plain content."""
    if reader is not None:
        return reader.push(text, final)
    return [Delta(content=text)] if text else []
