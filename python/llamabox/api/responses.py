"""OpenAI's Responses API, stateless: ``POST /v1/responses`` (and ``/responses``).

The input items become chat messages (a function call an assistant turn with ``tool_calls``, its
output a ``tool`` message) and go down the chat path: the same template, tools, grammar and
parser. The answer comes back as output items (reasoning, message, function calls), whole or as
the Responses streaming events.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from llamabox.api import sse
from llamabox.api.chat_setup import AnswerReader, answer_deltas, start_chat
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
    JSONObjectFormat,
    JSONSchemaFormat,
    JSONSchemaSpec,
    NamedToolChoice,
    SamplingFields,
    SourcedImagePart,
    TextPart,
    Tool,
)
from llamabox.api.protocol_responses import (
    FunctionCallItem,
    FunctionCallOutputItem,
    IncompleteDetails,
    InputContent,
    InputImage,
    InputItem,
    InputTokensDetails,
    MessageItem,
    OutputFunctionCall,
    OutputItem,
    OutputMessage,
    OutputReasoning,
    OutputTextPart,
    OutputTokensDetails,
    ReasoningTextPart,
    Refusal,
    ResponseObject,
    ResponsesRequest,
    ResponseUsage,
)
from llamabox.api.state import AppState, RequestStreamLike
from llamabox.types import InvalidRequestError, Usage

__all__ = ["routes"]

_request = msgspec.json.Decoder(ResponsesRequest)
_encoder = msgspec.json.Encoder()


def _text(content: str | list[InputContent], param: str) -> str:
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if isinstance(part, InputImage):
            raise InvalidRequestError("images belong to messages, not here", param=f"{param}[{j}]")
        texts.append(part.refusal if isinstance(part, Refusal) else part.text)
    return "\n".join(texts)


def _parts(content: str | list[InputContent], param: str) -> list[ContentPart]:
    """A message's content as chat parts: its texts joined as one part before each image, and
    each ``input_image`` (a data: or http(s) URL) as an image part."""
    if isinstance(content, str):
        return [TextPart(content)]
    parts: list[ContentPart] = []
    texts: list[str] = []
    for j, part in enumerate(content):
        if not isinstance(part, InputImage):
            texts.append(part.refusal if isinstance(part, Refusal) else part.text)
            continue
        if part.image_url is None:
            raise InvalidRequestError(
                "this server keeps no files: send the image as image_url (a data: URL)",
                param=f"{param}[{j}]",
            )
        if texts:
            parts.append(TextPart("\n".join(texts)))
            texts = []
        parts.append(SourcedImagePart(image_url=part.image_url, wire_param=f"{param}[{j}]"))
    if texts or not parts:
        parts.append(TextPart("\n".join(texts)))
    return parts


def _items(body: ResponsesRequest) -> list[InputItem]:
    if isinstance(body.input, str):
        return [MessageItem(role="user", content=body.input)]
    items: list[InputItem] = []
    for i, raw in enumerate(body.input):
        entry = raw if "type" in raw else {"type": "message", **raw}
        try:
            items.append(msgspec.convert(entry, InputItem))
        except msgspec.ValidationError as e:
            raise InvalidRequestError(f"input[{i}]: {e}", param=f"input[{i}]") from None
    return items


def chat_messages(body: ResponsesRequest) -> list[ChatMessage]:
    """The conversation as chat messages: consecutive function calls make one assistant turn."""
    out: list[ChatMessage] = []
    if body.instructions:
        out.append(ChatMessage(role="system", content=body.instructions))
    for i, item in enumerate(_items(body)):
        if isinstance(item, MessageItem):
            parts = _parts(item.content, f"input[{i}].content")
            out.append(ChatMessage(role=item.role, content=parts))
        elif isinstance(item, FunctionCallItem):
            call = InputToolCall(
                id=item.call_id,
                function=InputFunctionCall(name=item.name, arguments=item.arguments),
            )
            last = out[-1] if out else None
            if last is not None and last.role == "assistant" and last.tool_calls is not None:
                last.tool_calls.append(call)
            elif last is not None and last.role == "assistant" and last.tool_calls is None:
                last.tool_calls = [call]
            else:
                out.append(ChatMessage(role="assistant", content=None, tool_calls=[call]))
        elif isinstance(item, FunctionCallOutputItem):
            text = _text(item.output, f"input[{i}].output")
            out.append(ChatMessage(role="tool", tool_call_id=item.call_id, content=text))
        # reasoning items of earlier answers are not shown to the template
    if not out:
        raise InvalidRequestError("input holds no message", param="input")
    return out


def chat_request(body: ResponsesRequest) -> ChatCompletionRequest:
    if body.previous_response_id is not None:
        raise InvalidRequestError(
            "this server keeps no responses (stateless): send the whole conversation as input",
            param="previous_response_id",
        )
    tools = []
    for i, t in enumerate(body.tools or []):
        if t.type != "function" or t.name is None:
            raise InvalidRequestError(
                f"only function tools are served, not '{t.type}'", param=f"tools[{i}]"
            )
        fn = FunctionDef(
            name=t.name, description=t.description, parameters=t.parameters, strict=t.strict
        )
        tools.append(Tool(function=fn))
    choice = body.tool_choice
    tool_choice = (
        NamedToolChoice(function=FunctionName(choice.name))
        if choice is not None and not isinstance(choice, str)
        else choice
    )
    fields: dict[str, Any] = {f: getattr(body, f) for f in SamplingFields.__struct_fields__}
    fmt = body.text.format if body.text is not None else None
    if fmt is not None and fmt.type == "json_schema":
        spec = JSONSchemaSpec(name=fmt.name or "response", schema=fmt.schema, strict=fmt.strict)
        fields["response_format"] = JSONSchemaFormat(json_schema=spec)
    elif fmt is not None and fmt.type == "json_object":
        fields["response_format"] = JSONObjectFormat()
    return ChatCompletionRequest(
        messages=chat_messages(body),
        max_tokens=body.max_output_tokens,
        tools=tools or None,
        tool_choice=tool_choice,
        parallel_tool_calls=body.parallel_tool_calls,
        reasoning_effort=body.reasoning.effort if body.reasoning else None,
        chat_template_kwargs=body.chat_template_kwargs,
        **fields,
    )


class _Answer:
    """The output items of one answer, built from its deltas (streamed or not)."""

    def __init__(self) -> None:
        self.items: list[OutputItem] = []
        self._calls: dict[int, OutputFunctionCall] = {}

    def add(self, delta: Delta) -> tuple[str, OutputItem, bool]:
        """Adds a delta: (its text, the item it belongs to, whether that item is new)."""
        last = self.items[-1] if self.items else None
        if isinstance(delta.reasoning_content, str):
            if isinstance(last, OutputReasoning):
                last.content[0].text += delta.reasoning_content
                return delta.reasoning_content, last, False
            item: OutputItem = OutputReasoning(
                id=f"rs_{new_id()}", content=[ReasoningTextPart(text=delta.reasoning_content)]
            )
            self.items.append(item)
            return delta.reasoning_content, item, True
        if isinstance(delta.tool_calls, list):
            call = delta.tool_calls[0]
            arguments = call.function.arguments
            known = self._calls.get(call.index)
            if known is not None:
                known.arguments += arguments
                return arguments, known, False
            fc = OutputFunctionCall(
                id=f"fc_{new_id()}",
                call_id=call.id if isinstance(call.id, str) else new_id(),
                name=call.function.name if isinstance(call.function.name, str) else "",
                arguments=arguments,
            )
            self._calls[call.index] = fc
            self.items.append(fc)
            return arguments, fc, True
        text = delta.content if isinstance(delta.content, str) else ""
        if isinstance(last, OutputMessage):
            last.content[0].text += text
            return text, last, False
        msg = OutputMessage(id=f"msg_{new_id()}", content=[OutputTextPart(text=text)])
        self.items.append(msg)
        return text, msg, True


def _usage(u: Usage) -> ResponseUsage:
    return ResponseUsage(
        input_tokens=u.prompt_tokens,
        input_tokens_details=InputTokensDetails(u.cached_tokens),
        output_tokens=u.completion_tokens,
        output_tokens_details=OutputTokensDetails(0),
        total_tokens=u.total_tokens,
    )


def _response(state: AppState, body: ResponsesRequest, rid: str, created: int) -> ResponseObject:
    return ResponseObject(
        id=rid,
        created_at=created,
        model=state.model_name,
        status="in_progress",
        output=[],
        instructions=body.instructions,
        tools=body.tools or [],
        tool_choice=msgspec.to_builtins(body.tool_choice) if body.tool_choice else "auto",
        parallel_tool_calls=body.parallel_tool_calls is not False,
        temperature=body.temperature,
        top_p=body.top_p,
        max_output_tokens=body.max_output_tokens,
        metadata=body.metadata or {},
    )


def _finish(resp: ResponseObject, answer: _Answer, finish: str, usage: Usage) -> ResponseObject:
    resp.output = answer.items
    resp.usage = _usage(usage)
    if finish == "length":
        resp.status = "incomplete"
        resp.incomplete_details = IncompleteDetails("max_output_tokens")
    else:
        resp.status = "completed"
    return resp


async def create_response(req: Request, state: AppState) -> Response | StreamResponse:
    body = req.decode(_request)
    state = await state.use_model(body.model)
    chat = chat_request(body)
    streams, readers, _ = await start_chat(req, state, chat)
    rid, created = f"resp_{new_id()}", int(time.time())
    if body.stream:
        events = _events(_response(state, body, rid, created), streams[0], readers[0])
        return StreamResponse(sse.named_stream(events), sse.CONTENT_TYPE)
    answer = _Answer()
    finish, usage = "stop", Usage()
    try:
        async for out in streams[0]:
            for delta in answer_deltas(readers[0], out.text, out.finish_reason is not None):
                answer.add(delta)
            if out.finish_reason is not None:
                finish, usage = out.finish_reason, out.usage or usage
    finally:
        streams[0].cancel()
    return json_response(_finish(_response(state, body, rid, created), answer, finish, usage))


def _item_done(item: OutputItem, index: int) -> list[tuple[str, dict[str, Any]]]:
    """The events that close an output item."""
    out: list[tuple[str, dict[str, Any]]] = []
    base = {"item_id": item.id, "output_index": index}
    if isinstance(item, OutputMessage):
        part = item.content[0]
        out.append(
            (
                "response.output_text.done",
                base | {"content_index": 0, "text": part.text, "logprobs": []},
            )
        )
        out.append(
            (
                "response.content_part.done",
                base | {"content_index": 0, "part": msgspec.to_builtins(part)},
            )
        )
    elif isinstance(item, OutputReasoning):
        text = item.content[0].text
        out.append(("response.reasoning_text.done", base | {"content_index": 0, "text": text}))
    else:
        out.append(
            (
                "response.function_call_arguments.done",
                base | {"arguments": item.arguments, "name": item.name},
            )
        )
    item.status = "completed"
    out.append(
        ("response.output_item.done", {"output_index": index, "item": msgspec.to_builtins(item)})
    )
    return out  # fmt: skip


def _item_added(item: OutputItem, index: int) -> list[tuple[str, dict[str, Any]]]:
    shown = msgspec.to_builtins(item)
    shown["status"] = "in_progress"
    if isinstance(item, OutputMessage):
        shown["content"] = []
    elif isinstance(item, OutputReasoning):
        shown["content"] = []
    else:
        shown["arguments"] = ""
    out = [("response.output_item.added", {"output_index": index, "item": shown})]
    if isinstance(item, OutputMessage):
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        out.append(
            (
                "response.content_part.added",
                {"item_id": item.id, "output_index": index, "content_index": 0, "part": part},
            )
        )
    return out


def _delta_event(item: OutputItem, index: int, text: str) -> tuple[str, dict[str, Any]]:
    base: dict[str, Any] = {"item_id": item.id, "output_index": index, "delta": text}
    if isinstance(item, OutputMessage):
        return "response.output_text.delta", base | {"content_index": 0, "logprobs": []}
    if isinstance(item, OutputReasoning):
        return "response.reasoning_text.delta", base | {"content_index": 0}
    return "response.function_call_arguments.delta", base


async def _events(
    resp: ResponseObject, stream: RequestStreamLike, reader: AnswerReader | None
) -> AsyncIterator[tuple[str, bytes]]:
    seq = 0

    def emit(name: str, payload: dict[str, Any]) -> tuple[str, bytes]:
        nonlocal seq
        seq += 1
        return name, _encoder.encode({"type": name, "sequence_number": seq - 1, **payload})

    yield emit("response.created", {"response": msgspec.to_builtins(resp)})
    yield emit("response.in_progress", {"response": msgspec.to_builtins(resp)})
    answer = _Answer()
    finish, usage = "stop", Usage()
    try:
        async for out in stream:
            for delta in answer_deltas(reader, out.text, out.finish_reason is not None):
                n_before = len(answer.items)
                text, item, is_new = answer.add(delta)
                index = answer.items.index(item)
                if is_new:
                    if n_before:
                        for name, payload in _item_done(answer.items[n_before - 1], n_before - 1):
                            yield emit(name, payload)
                    for name, payload in _item_added(item, index):
                        yield emit(name, payload)
                if text:
                    yield emit(*_delta_event(item, index, text))
            if out.finish_reason is not None:
                finish, usage = out.finish_reason, out.usage or usage
    finally:
        stream.cancel()
    if answer.items:
        last = len(answer.items) - 1
        for name, payload in _item_done(answer.items[last], last):
            yield emit(name, payload)
    done = _finish(resp, answer, finish, usage)
    kind = "response.incomplete" if done.status == "incomplete" else "response.completed"
    yield emit(kind, {"response": msgspec.to_builtins(done)})


def routes() -> list[Route[AppState]]:
    return [
        Route("POST", path, create_response, generates=True, picks_model=True)
        for path in ("/v1/responses", "/responses")
    ]
