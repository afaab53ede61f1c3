"""Ollama's API: /api/generate, /api/chat (NDJSON streams ending with ``"done": true``),
/api/tags, /api/show, /api/embed, /api/version. Errors in Ollama's ``{"error": "..."}`` shape.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import msgspec

from llamabox.api.chat_setup import AnswerReader, setup_chat
from llamabox.api.errors import APIError, from_exception, ollama_body
from llamabox.api.http import Request, Response, Route, StreamResponse, json_response
from llamabox.api.protocol import AssistantMessage, ChatFields, ToolCall
from llamabox.api.protocol_ollama import (
    OllamaAssistantMessage,
    OllamaChatRequest,
    OllamaChatResponse,
    OllamaDone,
    OllamaEmbedRequest,
    OllamaEmbedResponse,
    OllamaFunctionCall,
    OllamaGenerateRequest,
    OllamaGenerateResponse,
    OllamaMessage,
    OllamaModel,
    OllamaModelDetails,
    OllamaOptions,
    OllamaShowRequest,
    OllamaShowResponse,
    OllamaTags,
    OllamaToolCall,
    OllamaVersion,
)
from llamabox.api.serving import (
    ANY_JSON_OBJECT,
    Collected,
    Prompt,
    collect_all,
    embed,
    infill_tokens,
    max_tokens_from,
    overlay,
    raw_schema_text,
    render_chat,
    submit,
)
from llamabox.api.state import VERSION, AppState, RequestStreamLike
from llamabox.types import GenerateRequest, InvalidRequestError, ModelInfo

__all__ = ["routes"]

NDJSON = "application/x-ndjson"

_generate_request = msgspec.json.Decoder(OllamaGenerateRequest)
_chat_request = msgspec.json.Decoder(OllamaChatRequest)
_embed_request = msgspec.json.Decoder(OllamaEmbedRequest)
_show_request = msgspec.json.Decoder(OllamaShowRequest)
_encoder = msgspec.json.Encoder()

# (text, done) -> one line of the answer; the statistics are filled in on the last one.
LineMaker = Callable[[str, bool], OllamaDone]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _generate_line(model: str) -> LineMaker:
    def make(text: str, done: bool) -> OllamaDone:
        return OllamaGenerateResponse(model=model, created_at=_now(), done=done, response=text)

    return make


def _chat_line(model: str) -> LineMaker:
    def make(text: str, done: bool) -> OllamaDone:
        message = OllamaAssistantMessage(text)
        return OllamaChatResponse(model=model, created_at=_now(), done=done, message=message)

    return make


def _request(
    state: AppState,
    request_id: str,
    prompt: Prompt,
    options: OllamaOptions | None,
    fmt: msgspec.Raw,
) -> GenerateRequest:
    opts = options or OllamaOptions()
    temperature = opts.temperature
    if temperature is not None and temperature < 0:  # as llama.cpp: negative means greedy
        temperature = 0.0
    sampling = overlay(
        state.config.sampling,
        temperature=temperature,
        top_k=opts.top_k,
        top_p=opts.top_p,
        min_p=opts.min_p,
        typical_p=opts.typical_p,
        repeat_penalty=opts.repeat_penalty,
        repeat_last_n=opts.repeat_last_n,
        presence_penalty=opts.presence_penalty,
        frequency_penalty=opts.frequency_penalty,
        seed=opts.seed,
        json_schema=_format_schema(fmt),
    )
    return GenerateRequest(
        prompt=prompt,
        max_tokens=max_tokens_from(("options.num_predict", opts.num_predict)),
        stop=[s for s in opts.stop or [] if s],
        sampling=sampling,
        request_id=request_id,
    )


def _format_schema(fmt: msgspec.Raw) -> str | None:
    """``"json"``: any JSON object; an object: a JSON schema."""
    if not len(fmt):
        return None
    if bytes(fmt).strip() == b'"json"':
        return ANY_JSON_OBJECT
    return raw_schema_text(fmt, "format")


def _finish(line: OllamaDone, result: Collected, started_ns: int) -> OllamaDone:
    usage = result.usage
    line.done_reason = result.finish_reason
    line.total_duration = time.monotonic_ns() - started_ns
    line.load_duration = 0
    line.prompt_eval_count = usage.prompt_tokens
    line.prompt_eval_duration = int(usage.prompt_ms * 1e6)
    line.eval_count = usage.completion_tokens
    line.eval_duration = int(usage.generation_ms * 1e6)
    return line


async def _answer(
    state: AppState,
    request: GenerateRequest,
    stream: bool,
    line: LineMaker,
    headers: dict[str, str],
) -> Response | StreamResponse:
    started = time.monotonic_ns()
    streams = await submit(state, [request.prompt], request, headers=headers)
    if stream:
        return StreamResponse(_ndjson(_lines(streams[0], line, started)), NDJSON)
    [result] = await collect_all(streams)
    return json_response(_finish(line(result.text, True), result, started))


async def _lines(
    stream: RequestStreamLike, line: LineMaker, started_ns: int
) -> AsyncIterator[bytes]:
    result = Collected()
    try:
        async for out in stream:
            result.add(out)
            if out.text:
                yield _encoder.encode(line(out.text, False))
    finally:
        stream.cancel()
    yield _encoder.encode(_finish(line("", True), result, started_ns))


async def _ndjson(lines: AsyncIterator[bytes]) -> AsyncGenerator[bytes, None]:
    """One JSON object per line; a failure after the headers is a last ``{"error": ...}`` line."""
    try:
        async for item in lines:
            yield item + b"\n"
    except Exception as exc:  # every failure becomes the stream's error line
        yield ollama_body(from_exception(exc)) + b"\n"
    finally:
        aclose = getattr(lines, "aclose", None)
        if aclose is not None:
            await aclose()


def _loaded(line: LineMaker) -> Response:
    """Ollama answers an empty prompt by loading the model: done at once."""
    out = line("", True)
    out.done_reason = "load"
    return json_response(out)


def _no_images(images: list[str] | None, param: str) -> None:
    if images:
        raise InvalidRequestError("image input needs a multimodal projector", param=param)


async def generate(req: Request, state: AppState) -> Response | StreamResponse:
    body = req.decode(_generate_request)
    _no_images(body.images, "images")
    line = _generate_line(state.model_name)
    prompt: Prompt
    if body.suffix:
        prompt = await infill_tokens(state, body.prompt, body.suffix)
    elif not body.prompt:
        return _loaded(line)
    elif body.raw:
        prompt = body.prompt
    else:
        messages = [{"role": "system", "content": body.system}] if body.system else []
        messages.append({"role": "user", "content": body.prompt})
        prompt = await render_chat(state, messages)
    request = _request(state, req.request_id, prompt, body.options, body.format)
    return await _answer(state, request, body.stream, line, req.headers)


def _chat_messages(messages: list[OllamaMessage]) -> list[dict[str, Any]]:
    """Ollama's messages as the template takes them. Ollama's calls carry no ids: each gets one
    by its place (nine letters and digits, which every template takes), and each tool message
    answers the earliest call of the last assistant turn not answered yet."""
    out: list[dict[str, Any]] = []
    unanswered: list[str] = []
    n_calls = 0
    for i, m in enumerate(messages):
        _no_images(m.images, f"messages[{i}].images")
        entry: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.thinking:
            entry["reasoning_content"] = m.thinking
        if m.tool_calls:
            calls: list[dict[str, Any]] = []
            for call in m.tool_calls:
                cid = call.id if isinstance(call.id, str) else f"call{n_calls:05d}"
                n_calls += 1
                fn = {"name": call.function.name, "arguments": json.dumps(call.function.arguments)}
                calls.append({"id": cid, "type": "function", "function": fn})
            entry["tool_calls"] = calls
            entry["content"] = m.content or None
            unanswered = [c["id"] for c in calls]
        if m.role == "tool":
            if m.tool_name:
                entry["name"] = m.tool_name
            if unanswered:
                entry["tool_call_id"] = unanswered.pop(0)
        out.append(entry)
    return out


def _ollama_message(msg: AssistantMessage) -> OllamaAssistantMessage:
    out = OllamaAssistantMessage(msg.content or "")
    if isinstance(msg.reasoning_content, str):
        out.thinking = msg.reasoning_content
    if isinstance(msg.tool_calls, list):
        out.tool_calls = [_ollama_call(i, c) for i, c in enumerate(msg.tool_calls)]
    return out


def _ollama_call(index: int, call: ToolCall) -> OllamaToolCall:
    try:
        arguments = json.loads(call.function.arguments)
    except json.JSONDecodeError:  # cut off by num_predict: incomplete
        arguments = {}
    if not isinstance(arguments, dict):
        arguments = {"value": arguments}
    fn = OllamaFunctionCall(name=call.function.name, arguments=arguments, index=index)
    return OllamaToolCall(function=fn, id=call.id)


async def chat(req: Request, state: AppState) -> Response | StreamResponse:
    body = req.decode(_chat_request)
    line = _chat_line(state.model_name)
    if not body.messages:
        return _loaded(line)
    fields = ChatFields(tools=body.tools)
    if body.think is False:
        fields.reasoning_effort = "none"
    elif isinstance(body.think, str):
        fields.reasoning_effort = body.think
    request = _request(state, req.request_id, "", body.options, body.format)
    setup = await setup_chat(
        state, fields, _chat_messages(body.messages), request.sampling, request_grammar=False
    )
    request = msgspec.structs.replace(
        request, prompt=setup.prompt, sampling=setup.sampling, stop=[*request.stop, *setup.stops]
    )
    reader = setup.reader(state)
    if reader is None:
        return await _answer(state, request, body.stream, line, req.headers)
    started = time.monotonic_ns()
    streams = await submit(state, [setup.prompt], request, headers=req.headers)
    if body.stream:
        return StreamResponse(_ndjson(_read_lines(streams[0], reader, state, started)), NDJSON)
    [result] = await collect_all(streams)
    reader.push(result.text, True)
    message = _ollama_message(reader.message())
    out = OllamaChatResponse(model=state.model_name, created_at=_now(), done=True, message=message)
    return json_response(_finish(out, result, started))


async def _read_lines(
    stream: RequestStreamLike, reader: AnswerReader, state: AppState, started_ns: int
) -> AsyncIterator[bytes]:
    """An answer read through the template's parser: text and thinking as they come, the
    tool calls whole, in one line before the last."""
    result = Collected()
    line = _chat_line(state.model_name)
    try:
        async for out in stream:
            result.add(out)
            for delta in reader.push(out.text, out.finish_reason is not None):
                if isinstance(delta.content, str) and delta.content:
                    yield _encoder.encode(line(delta.content, False))
                elif isinstance(delta.reasoning_content, str):
                    chunk = line("", False)
                    assert isinstance(chunk, OllamaChatResponse)
                    chunk.message.thinking = delta.reasoning_content
                    yield _encoder.encode(chunk)
    finally:
        stream.cancel()
    message = _ollama_message(reader.message())
    if isinstance(message.tool_calls, list):
        calls = OllamaChatResponse(
            model=state.model_name, created_at=_now(), done=False,
            message=OllamaAssistantMessage("", tool_calls=message.tool_calls),
        )  # fmt: skip
        yield _encoder.encode(calls)
    yield _encoder.encode(_finish(line("", True), result, started_ns))


async def embed_(req: Request, state: AppState) -> Response:
    body = req.decode(_embed_request)
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not texts:
        raise InvalidRequestError("input is empty", param="input")
    started = time.monotonic_ns()
    inputs: list[Prompt] = list(texts)
    if body.truncate:
        inputs = await _truncated(state, texts)
    results = await embed(state, inputs)
    return json_response(
        OllamaEmbedResponse(
            model=state.model_name,
            embeddings=[r.vector for r in results],
            total_duration=time.monotonic_ns() - started,
            load_duration=0,
            prompt_eval_count=sum(r.n_tokens for r in results),
        )
    )


async def _truncated(state: AppState, texts: list[str]) -> list[Prompt]:
    """The texts, as tokens cut to what one input may have (an input is embedded in one
    batch), when one of them is longer."""
    most = state.engine.model_info.n_embd_tokens_max
    tokens = [await state.engine.tokenize(t, parse_special=False) for t in texts]
    if all(len(t) <= most for t in tokens):
        return list(texts)
    return [t[:most] for t in tokens]


_QUANT = re.compile(r"\b(I?Q\d\w*|BF16|F16|F32)\b", re.IGNORECASE)


def _details(info: ModelInfo) -> OllamaModelDetails:
    n = info.n_params
    size = f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"
    quant = _QUANT.search(info.description)
    return OllamaModelDetails(
        family=info.architecture,
        families=[info.architecture],
        parameter_size=size,
        quantization_level=quant.group(1).upper() if quant else "",
    )


async def tags(req: Request, state: AppState) -> Response:
    info = state.engine.model_info
    path = Path(info.path)
    mtime = path.stat().st_mtime if path.exists() else state.created
    digest = hashlib.sha256(f"{path}:{info.size_bytes}:{mtime}".encode()).hexdigest()
    model = OllamaModel(
        name=state.model_name,
        model=state.model_name,
        modified_at=datetime.fromtimestamp(mtime, timezone.utc).isoformat(),
        size=info.size_bytes,
        digest=digest,
        details=_details(info),
    )
    return json_response(OllamaTags([model]))


async def show(req: Request, state: AppState) -> Response:
    body = req.decode(_show_request)
    name = body.model or body.name
    if not state.model_matches(name):
        raise APIError(404, f"model '{name}' not found")
    info = state.engine.model_info
    arch = info.architecture
    capabilities = ["completion"]
    if state.config.engine.embeddings:
        capabilities.append("embedding")
    if info.has_fim:
        capabilities.append("insert")
    return json_response(
        OllamaShowResponse(
            modelfile=f"FROM {info.path}\n",
            parameters="",
            template=info.chat_template,
            details=_details(info),
            model_info={
                "general.architecture": arch,
                "general.parameter_count": info.n_params,
                f"{arch}.context_length": info.n_ctx_train,
                f"{arch}.embedding_length": info.n_embd,
            },
            capabilities=capabilities,
        )
    )


async def version(req: Request, state: AppState) -> Response:
    return json_response(OllamaVersion(VERSION))


def routes() -> list[Route[AppState]]:
    return [
        Route("POST", "/api/generate", generate, generates=True, ollama=True),
        Route("POST", "/api/chat", chat, generates=True, ollama=True),
        Route("POST", "/api/embed", embed_, generates=True, ollama=True),
        Route("GET", "/api/tags", tags, ollama=True),
        Route("POST", "/api/show", show, ollama=True),
        Route("GET", "/api/version", version, needs_model=False, ollama=True),
    ]
