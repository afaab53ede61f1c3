"""Anthropic's Messages API: ``POST /v1/messages`` and ``/v1/messages/count_tokens``.

Messages become chat messages (``tool_use`` blocks an assistant turn's ``tool_calls``,
``tool_result`` blocks ``tool`` messages, ``thinking`` blocks its reasoning) and go down the chat
path. The answer comes back as content blocks (thinking, text, tool_use), whole or as Anthropic's
stream events. Errors keep the OpenAI shape every route of this server answers with.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, Literal

import msgspec

from llamabox.api import sse
from llamabox.api.chat_setup import AnswerReader, answer_deltas, prepare_chat, start_chat
from llamabox.api.http import Request, Response, Route, StreamResponse, json_response, new_id
from llamabox.api.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    ContentPart,
    Delta,
    FunctionDef,
    FunctionName,
    InputFunctionCall,
    InputToolCall,
    NamedToolChoice,
    SamplingFields,
    SourcedImagePart,
    TextPart,
    Tool,
)
from llamabox.api.protocol_anthropic import (
    AnthropicTool,
    CountTokensRequest,
    ImageBlock,
    InputMessage,
    MessageObject,
    MessagesRequest,
    MessagesUsage,
    OutBlock,
    OutTextBlock,
    OutThinkingBlock,
    OutToolUseBlock,
    TextBlock,
    ThinkingBlock,
    TokenCount,
    ToolChoice,
    ToolResultBlock,
    ToolUseBlock,
)
from llamabox.api.state import AppState, RequestStreamLike
from llamabox.types import InvalidRequestError, Usage

__all__ = ["routes"]

ToolChoiceName = Literal["none", "auto", "required"]

_request = msgspec.json.Decoder(MessagesRequest)
_count_request = msgspec.json.Decoder(CountTokensRequest)
_encoder = msgspec.json.Encoder()


def _image(block: ImageBlock, param: str) -> SourcedImagePart:
    """An image block (base64 or url source) as a chat image part."""
    source = block.source
    kind = source.get("type")
    if kind == "base64" and isinstance(source.get("data"), str):
        media_type = source.get("media_type") or "application/octet-stream"
        url = f"data:{media_type};base64,{source['data']}"
        return SourcedImagePart(image_url=url, wire_param=param)
    if kind == "url" and isinstance(source.get("url"), str):
        return SourcedImagePart(image_url=source["url"], wire_param=param)
    raise InvalidRequestError(
        "an image's source must be {type: base64, media_type, data} or {type: url, url}",
        param=f"{param}.source",
    )


def _result_content(block: ToolResultBlock, param: str) -> str | list[ContentPart]:
    """A tool result's content: its text blocks joined by newlines, or, when it holds images
    (a screenshot tool's, say), its text and image parts in order."""
    if isinstance(block.content, str):
        return block.content
    if not any(isinstance(part, ImageBlock) for part in block.content):
        return "\n".join(part.text for part in block.content if isinstance(part, TextBlock))
    parts: list[ContentPart] = []
    for k, part in enumerate(block.content):
        if isinstance(part, ImageBlock):
            parts.append(_image(part, f"{param}.content[{k}]"))
        else:
            parts.append(TextPart(part.text))
    return parts


def _turn(message: InputMessage, i: int) -> list[ChatMessage]:
    """One Anthropic message as chat messages: a user turn's tool results come first, as tool
    messages; an assistant turn's text, thinking and tool uses make one message."""
    if isinstance(message.content, str):
        return [ChatMessage(role=message.role, content=message.content)]
    texts: list[str] = []
    parts: list[ContentPart] = []  # a user turn's texts and images, in order
    reasoning: list[str] = []
    calls: list[InputToolCall] = []
    out: list[ChatMessage] = []
    for j, block in enumerate(message.content):
        param = f"messages[{i}].content[{j}]"
        if isinstance(block, TextBlock):
            texts.append(block.text)
            parts.append(TextPart(block.text))
        elif isinstance(block, ImageBlock):
            if message.role != "user":
                raise InvalidRequestError("image blocks belong to user turns", param=param)
            parts.append(_image(block, param))
        elif isinstance(block, ToolUseBlock):
            if message.role != "assistant":
                raise InvalidRequestError("tool_use blocks belong to assistant turns", param=param)
            fn = InputFunctionCall(name=block.name, arguments=json.dumps(block.input))
            calls.append(InputToolCall(id=block.id, function=fn))
        elif isinstance(block, ToolResultBlock):
            if message.role != "user":
                raise InvalidRequestError("tool_result blocks belong to user turns", param=param)
            content = _result_content(block, param)
            out.append(ChatMessage(role="tool", tool_call_id=block.tool_use_id, content=content))
        elif isinstance(block, ThinkingBlock):
            reasoning.append(block.thinking)
        # redacted thinking cannot be shown to the template
    if message.role == "assistant":
        out.append(
            ChatMessage(
                role="assistant",
                content="".join(texts) if texts or not calls else None,
                tool_calls=calls or None,
                reasoning_content="\n".join(reasoning) or None,
            )
        )
    elif parts:
        out.append(ChatMessage(role="user", content=parts))
    return out


def _tools(tools: list[AnthropicTool] | None) -> list[Tool] | None:
    out = []
    for i, t in enumerate(tools or []):
        if t.type not in (None, "custom"):
            raise InvalidRequestError(
                f"only custom tools are served, not '{t.type}'", param=f"tools[{i}]"
            )
        fn = FunctionDef(name=t.name, description=t.description, parameters=t.input_schema)
        out.append(Tool(function=fn))
    return out or None


def _tool_choice(choice: ToolChoice | None) -> ToolChoiceName | NamedToolChoice | None:
    if choice is None:
        return None
    if choice.type == "tool":
        if not choice.name:
            raise InvalidRequestError("tool_choice of type tool needs a name", param="tool_choice")
        return NamedToolChoice(function=FunctionName(choice.name))
    names: dict[str, ToolChoiceName] = {"auto": "auto", "any": "required", "none": "none"}
    return names[choice.type]


def chat_request(body: MessagesRequest | CountTokensRequest) -> ChatCompletionRequest:
    messages: list[ChatMessage] = []
    if body.system:
        system = body.system
        text = system if isinstance(system, str) else "\n".join(b.text for b in system)
        messages.append(ChatMessage(role="system", content=text))
    for i, message in enumerate(body.messages):
        messages += _turn(message, i)
    kwargs: dict[str, Any] = {}
    if body.thinking is not None and body.thinking.type != "adaptive":
        kwargs["enable_thinking"] = body.thinking.type == "enabled"
    choice = body.tool_choice
    fields: dict[str, Any] = {}
    if isinstance(body, MessagesRequest):
        fields = {f: getattr(body, f) for f in SamplingFields.__struct_fields__}
        if body.stop_sequences:
            fields["stop"] = body.stop_sequences
        fields["max_tokens"] = body.max_tokens
    return ChatCompletionRequest(
        messages=messages,
        tools=_tools(body.tools),
        tool_choice=_tool_choice(choice),
        parallel_tool_calls=False if choice and choice.disable_parallel_tool_use else None,
        chat_template_kwargs=kwargs or None,
        **fields,
    )


class _Blocks:
    """The content blocks of one answer, built from its deltas."""

    def __init__(self) -> None:
        self.blocks: list[OutBlock] = []
        self._calls: dict[int, int] = {}  # tool call index -> block index
        self._arguments: dict[int, str] = {}  # block index -> argument text so far

    def add(self, delta: Delta) -> tuple[int, dict[str, Any] | None]:
        """The index of the block the delta goes to, and the stream delta it makes, if any."""
        last = len(self.blocks) - 1
        if isinstance(delta.reasoning_content, str):
            text = delta.reasoning_content
            if last >= 0 and isinstance(self.blocks[last], OutThinkingBlock):
                self.blocks[last].thinking += text  # type: ignore[union-attr]
                return last, {"type": "thinking_delta", "thinking": text}
            self.blocks.append(OutThinkingBlock(thinking=text))
            return last + 1, {"type": "thinking_delta", "thinking": text}
        if isinstance(delta.tool_calls, list):
            call = delta.tool_calls[0]
            arguments = call.function.arguments
            at = self._calls.get(call.index)
            if at is None:
                at = len(self.blocks)
                self._calls[call.index] = at
                name = call.function.name if isinstance(call.function.name, str) else ""
                cid = call.id if isinstance(call.id, str) else new_id()
                self.blocks.append(OutToolUseBlock(id=cid, name=name, input={}))
                self._arguments[at] = ""
            self._arguments[at] += arguments
            part = {"type": "input_json_delta", "partial_json": arguments} if arguments else None
            return at, part
        text = delta.content if isinstance(delta.content, str) else ""
        if last >= 0 and isinstance(self.blocks[last], OutTextBlock):
            self.blocks[last].text += text  # type: ignore[union-attr]
            return last, {"type": "text_delta", "text": text}
        self.blocks.append(OutTextBlock(text=text))
        return last + 1, {"type": "text_delta", "text": text}

    def finish(self) -> list[OutBlock]:
        for at, text in self._arguments.items():
            block = self.blocks[at]
            assert isinstance(block, OutToolUseBlock)
            try:
                value = json.loads(text) if text.strip() else {}
            except json.JSONDecodeError:
                value = {}  # cut off (max_tokens): the arguments are incomplete
            block.input = value if isinstance(value, dict) else {"value": value}
        return self.blocks

    @property
    def has_calls(self) -> bool:
        return bool(self._calls)


def _stop(out_reason: str, stop_word: str | None, blocks: _Blocks) -> tuple[str, str | None]:
    if out_reason == "length":
        return "max_tokens", None
    if blocks.has_calls:
        return "tool_use", None
    if stop_word:
        return "stop_sequence", stop_word
    return "end_turn", None


def _usage(u: Usage) -> MessagesUsage:
    return MessagesUsage(
        input_tokens=max(u.prompt_tokens - u.cached_tokens, 0),
        output_tokens=u.completion_tokens,
        cache_read_input_tokens=u.cached_tokens,
    )


async def create_message(req: Request, state: AppState) -> Response | StreamResponse:
    body = req.decode(_request)
    state = await state.use_model(body.model)
    streams, readers, _ = await start_chat(req, state, chat_request(body))
    mid = f"msg_{new_id()}"
    if body.stream:
        events = _events(state, mid, streams[0], readers[0])
        return StreamResponse(sse.named_stream(events, _anthropic_error), sse.CONTENT_TYPE)
    blocks = _Blocks()
    reason, stop_word, usage = "stop", None, Usage()
    try:
        async for out in streams[0]:
            for delta in answer_deltas(readers[0], out.text, out.finish_reason is not None):
                blocks.add(delta)
            if out.finish_reason is not None:
                reason, stop_word, usage = out.finish_reason, out.stop_word, out.usage or usage
    finally:
        streams[0].cancel()
    stop_reason, stop_sequence = _stop(reason, stop_word, blocks)
    return json_response(
        MessageObject(
            id=mid,
            model=state.model_name,
            content=blocks.finish(),
            stop_reason=stop_reason,
            stop_sequence=stop_sequence,
            usage=_usage(usage),
        )
    )


def _anthropic_error(openai_body: bytes) -> bytes:
    """An error event in Anthropic's shape, from the OpenAI error body."""
    error = msgspec.json.decode(openai_body)["error"]
    detail = {"type": error["type"], "message": error["message"]}
    return _encoder.encode({"type": "error", "error": detail})


async def _events(
    state: AppState, mid: str, stream: RequestStreamLike, reader: AnswerReader | None
) -> AsyncIterator[tuple[str, bytes]]:
    def emit(name: str, payload: dict[str, Any]) -> tuple[str, bytes]:
        return name, _encoder.encode({"type": name, **payload})

    start = MessageObject(id=mid, model=state.model_name, content=[], usage=_usage(Usage()))
    blocks = _Blocks()
    open_at: int | None = None
    reason, stop_word, usage = "stop", None, Usage()
    yield emit("message_start", {"message": msgspec.to_builtins(start)})
    try:
        async for out in stream:
            for delta in answer_deltas(reader, out.text, out.finish_reason is not None):
                at, part = blocks.add(delta)
                if at != open_at:
                    if open_at is not None:
                        yield emit("content_block_stop", {"index": open_at})
                    shown = msgspec.to_builtins(blocks.blocks[at])
                    for key in ("text", "thinking"):
                        if key in shown:
                            shown[key] = ""
                    yield emit("content_block_start", {"index": at, "content_block": shown})
                    open_at = at
                if part is not None:
                    yield emit("content_block_delta", {"index": at, "delta": part})
            if out.finish_reason is not None:
                reason, stop_word, usage = out.finish_reason, out.stop_word, out.usage or usage
    finally:
        stream.cancel()
    if open_at is not None:
        yield emit("content_block_stop", {"index": open_at})
    stop_reason, stop_sequence = _stop(reason, stop_word, blocks)
    final = {"stop_reason": stop_reason, "stop_sequence": stop_sequence}
    yield emit("message_delta", {"delta": final, "usage": msgspec.to_builtins(_usage(usage))})
    yield emit("message_stop", {})


async def count_tokens(req: Request, state: AppState) -> Response:
    body = req.decode(_count_request)
    state = await state.use_model(body.model)
    chat, _ = await prepare_chat(req, state, chat_request(body))
    tokens = await state.engine.tokenize(chat.prompt)
    return json_response(TokenCount(len(tokens)))


def routes() -> list[Route[AppState]]:
    out: list[Route[AppState]] = []
    for prefix in ("/v1", ""):
        out += [
            Route("POST", f"{prefix}/messages", create_message, generates=True, picks_model=True),
            Route(
                "POST",
                f"{prefix}/messages/count_tokens",
                count_tokens,
                generates=True,
                picks_model=True,
            ),
        ]
    return out
