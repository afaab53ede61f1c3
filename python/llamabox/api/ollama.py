"""Ollama's API: /api/generate, /api/chat (NDJSON streams ending with ``"done": true``),
/api/tags, /api/ps, /api/show, /api/embed, /api/version. Errors in Ollama's ``{"error": "..."}``
shape. A request's ``keep_alive`` sets how long its model stays loaded once idle.
"""

from __future__ import annotations

import hashlib
import json
import math
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
from llamabox.api.media import MediaRef, base64_refs, load_media, marker
from llamabox.api.models_registry import ModelEntry
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
    OllamaRunning,
    OllamaRunningModel,
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


def _loaded(line: LineMaker, reason: str = "load") -> Response:
    """Ollama answers an empty prompt by loading the model (or, with keep_alive 0, unloading
    it): done at once."""
    out = line("", True)
    out.done_reason = reason
    return json_response(out)


# Go's time.ParseDuration units, as Ollama reads keep_alive ("5m", "1h30m", "-1s").
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0,
                 "m": 60.0, "h": 3600.0}  # fmt: skip


def keep_alive_seconds(value: str | float | None) -> float | None:
    """Ollama's keep_alive in seconds (negative: forever, 0: unload at once); None: not given.
    A number is seconds; a text is a Go duration, or a number of seconds."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            sign, body = (-1.0, text[1:]) if text.startswith("-") else (1.0, text.lstrip("+"))
            parts = _DURATION_PART.findall(body)
            if not body or "".join(n + u for n, u in parts) != body:
                raise InvalidRequestError(
                    f"keep_alive {value!r} is not a duration (like 5m, 1h30m or 300s) or a "
                    "number of seconds",
                    param="keep_alive",
                ) from None
            seconds = sign * sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)
    else:
        seconds = float(value)
    if not math.isfinite(seconds):
        return -1.0 if seconds < 0 else 2.0**40  # as good as forever, either way
    return seconds


async def _model(state: AppState, name: str, keep_alive: str | float | None) -> AppState:
    return await state.use_model(name, keep_alive=keep_alive_seconds(keep_alive))


def _unload(state: AppState, name: str, line: Callable[[str], LineMaker]) -> Response:
    """keep_alive 0 and nothing to generate: unload the model (when loaded), at once."""
    entry = state.models.find(name)
    state.models.unload_if_loaded(entry)
    return _loaded(line(entry.name), "unload")


async def generate(req: Request, state: AppState) -> Response | StreamResponse:
    body = req.decode(_generate_request)
    if not body.prompt and not body.suffix and keep_alive_seconds(body.keep_alive) == 0:
        return _unload(state, body.model, _generate_line)
    state = await _model(state, body.model, body.keep_alive)
    line = _generate_line(state.model_name)
    # Ollama puts a request's images before its prompt.
    images = "".join(marker(state, "images") for _ in body.images or [])
    prompt: Prompt
    if body.suffix:
        if images:
            raise InvalidRequestError("images cannot be combined with suffix", param="images")
        prompt = await infill_tokens(state, body.prompt, body.suffix)
    elif not body.prompt and not images:
        return _loaded(line)
    elif body.raw:
        prompt = images + body.prompt
    else:
        messages = [{"role": "system", "content": body.system}] if body.system else []
        messages.append({"role": "user", "content": images + body.prompt})
        prompt = await render_chat(state, messages)
    request = _request(state, req.request_id, prompt, body.options, body.format)
    if images:
        media = await load_media(state, base64_refs(body.images, "images"))
        request = msgspec.structs.replace(request, media=media)
    return await _answer(state, request, body.stream, line, req.headers)


def _chat_media(
    state: AppState, messages: list[OllamaMessage]
) -> tuple[str | None, list[MediaRef]]:
    """The media marker (None when no message has images) and the messages' images in order."""
    refs = [
        r for i, m in enumerate(messages) for r in base64_refs(m.images, f"messages[{i}].images")
    ]
    return (marker(state, refs[0].param) if refs else None), refs


def _chat_messages(messages: list[OllamaMessage], mark: str | None = None) -> list[dict[str, Any]]:
    """Ollama's messages as the template takes them (a message's images, as ``mark``, before
    its text). Ollama's calls carry no ids: each gets one by its place (nine letters and digits,
    which every template takes), and each tool message answers the earliest call of the last
    assistant turn not answered yet."""
    out: list[dict[str, Any]] = []
    unanswered: list[str] = []
    n_calls = 0
    for m in messages:
        content = (mark or "") * len(m.images or []) + m.content if m.images else m.content
        entry: dict[str, Any] = {"role": m.role, "content": content}
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
    if not body.messages and keep_alive_seconds(body.keep_alive) == 0:
        return _unload(state, body.model, _chat_line)
    state = await _model(state, body.model, body.keep_alive)
    line = _chat_line(state.model_name)
    if not body.messages:
        return _loaded(line)
    fields = ChatFields(tools=body.tools)
    if body.think is False:
        fields.reasoning_effort = "none"
    elif isinstance(body.think, str):
        fields.reasoning_effort = body.think
    request = _request(state, req.request_id, "", body.options, body.format)
    mark, refs = _chat_media(state, body.messages)
    media = await load_media(state, refs)
    setup = await setup_chat(
        state, fields, _chat_messages(body.messages, mark), request.sampling, request_grammar=False
    )
    request = msgspec.structs.replace(
        request,
        prompt=setup.prompt,
        media=media,
        sampling=setup.sampling,
        stop=[*request.stop, *setup.stops],
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
    state = await _model(state, body.model, body.keep_alive)
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


def _model_entry(state: AppState, entry: ModelEntry) -> OllamaModel:
    """A model as /api/tags lists it; one never loaded is described by its file alone."""
    info = entry.engine.model_info if entry.engine.is_loaded else entry.info
    path = Path(info.path if info else entry.spec.engine.model)
    stat = path.stat() if path.exists() else None
    mtime = stat.st_mtime if stat else state.created
    size = info.size_bytes if info else stat.st_size if stat else 0
    digest = hashlib.sha256(f"{path}:{size}:{mtime}".encode()).hexdigest()
    details = _details(info) if info else OllamaModelDetails(
        family="", families=[], parameter_size="", quantization_level=""
    )  # fmt: skip
    return OllamaModel(
        name=entry.name,
        model=entry.name,
        modified_at=datetime.fromtimestamp(mtime, timezone.utc).isoformat(),
        size=size,
        digest=digest,
        details=details,
    )


async def tags(req: Request, state: AppState) -> Response:
    return json_response(OllamaTags([_model_entry(state, e) for e in state.models.entries]))


# Ollama's expires_at of a model kept loaded for good (now + Go's longest duration).
_FOREVER_S = 2**63 / 1e9


async def ps(req: Request, state: AppState) -> Response:
    """The loaded models and when each unloads if it stays idle (Ollama's /api/ps)."""
    running = []
    for entry in state.models.entries:
        if entry.status != "loaded":
            continue
        listed = _model_entry(state, entry)
        expires = state.models.expires_at(entry)
        if expires is None:
            expires = time.time() + (entry.idle_ttl if entry.idle_ttl is not None else _FOREVER_S)
        at = datetime.fromtimestamp(min(expires, 253402300799.0), timezone.utc)
        running.append(
            OllamaRunningModel(**msgspec.structs.asdict(listed), expires_at=at.isoformat())
        )
    return json_response(OllamaRunning(running))


async def show(req: Request, state: AppState) -> Response:
    body = req.decode(_show_request)
    name = body.model or body.name
    if not state.models.exists(name):
        raise APIError(404, f"model '{name}' not found")
    state = await state.use_model(name, touch=False)
    info = state.engine.model_info
    arch = info.architecture
    capabilities = ["completion"]
    if state.config.engine.embeddings:
        capabilities.append("embedding")
    if info.has_fim:
        capabilities.append("insert")
    if info.vision:
        capabilities.append("vision")
    if info.audio:
        capabilities.append("audio")
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
        Route("POST", "/api/generate", generate, generates=True, ollama=True, picks_model=True),
        Route("POST", "/api/chat", chat, generates=True, ollama=True, picks_model=True),
        Route("POST", "/api/embed", embed_, generates=True, ollama=True, picks_model=True),
        Route("GET", "/api/tags", tags, ollama=True, picks_model=True),
        Route("GET", "/api/ps", ps, ollama=True, picks_model=True),
        Route("POST", "/api/show", show, ollama=True, picks_model=True),
        Route("GET", "/api/version", version, needs_model=False, ollama=True),
    ]
