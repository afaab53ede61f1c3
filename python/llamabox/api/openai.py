"""OpenAI's endpoints: chat completions, completions, embeddings (with and without /v1); the
models list is ``model_routes``'."""

from __future__ import annotations

import base64
import time
from collections.abc import AsyncIterator, Sequence

import msgspec
import numpy as np

from llamabox.api import sse
from llamabox.api.chat_setup import AnswerReader, start_chat
from llamabox.api.http import Request, Response, Route, StreamResponse, json_response, new_id
from llamabox.api.media import completion_media
from llamabox.api.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatLogprobs,
    ChatTokenLogprob,
    ChatTopLogprob,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    Delta,
    Embedding,
    EmbeddingList,
    EmbeddingRequest,
    EmbeddingUsage,
    MultimodalPrompt,
    UsageInfo,
)
from llamabox.api.serving import (
    Prompt,
    check_embeddings,
    check_n,
    collect_all,
    embed,
    finish_reason,
    generate_template,
    infill_tokens,
    max_tokens_from,
    merge,
    prompt_list,
    submit,
    timings,
    usage_info,
)
from llamabox.api.state import AppState, RequestStreamLike
from llamabox.types import InvalidRequestError, MediaInput, TokenLogprob, Usage

__all__ = ["routes"]

_chat_request = msgspec.json.Decoder(ChatCompletionRequest)
_completion_request = msgspec.json.Decoder(CompletionRequest)
_embedding_request = msgspec.json.Decoder(EmbeddingRequest)
_encoder = msgspec.json.Encoder()


class _Stamp:
    """id, created, model and fingerprint: the same on every chunk of one response."""

    __slots__ = ("created", "fingerprint", "id", "model")

    def __init__(self, state: AppState, prefix: str) -> None:
        self.id = f"{prefix}-{new_id()}"
        self.created = int(time.time())
        self.model = state.model_name
        self.fingerprint = state.fingerprint


def _text(piece: bytes) -> str:
    return piece.decode("utf-8", "replace")


def _chat_logprobs(items: Sequence[TokenLogprob]) -> ChatLogprobs:
    return ChatLogprobs(
        [
            ChatTokenLogprob(
                _text(lp.text),
                lp.logprob,
                list(lp.text),
                [ChatTopLogprob(_text(t.text), t.logprob, list(t.text)) for t in lp.top],
            )
            for lp in items
        ]
    )


async def chat_completions(req: Request, state: AppState) -> Response | StreamResponse:
    body = req.decode(_chat_request)
    state = await state.use_model(body.model)
    streams, readers, template = await start_chat(req, state, body)
    stamp = _Stamp(state, "chatcmpl")
    with_logprobs = template.sampling.logprobs
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        events = _chat_events(stamp, streams, readers, with_logprobs, include_usage)
        return StreamResponse(sse.stream(events), sse.CONTENT_TYPE)
    results = await collect_all(streams)
    choices = []
    for i, (r, reader) in enumerate(zip(results, readers, strict=True)):
        message = AssistantMessage(content=r.text)
        reason = r.finish_reason
        if reader is not None:
            reader.push(r.text, final=True)
            message = reader.message()
            reason = reader.finish_reason(reason)
        choices.append(
            ChatChoice(
                index=i,
                message=message,
                logprobs=_chat_logprobs(r.logprobs) if with_logprobs else None,
                finish_reason=reason,
            )
        )
    return json_response(
        ChatCompletion(
            id=stamp.id,
            created=stamp.created,
            model=stamp.model,
            system_fingerprint=stamp.fingerprint,
            choices=choices,
            usage=usage_info([r.usage for r in results], body.n),
            timings=timings(results[0].usage),
        )
    )


def _chat_chunk(stamp: _Stamp, choices: list[ChatChunkChoice]) -> ChatCompletionChunk:
    return ChatCompletionChunk(
        id=stamp.id,
        created=stamp.created,
        model=stamp.model,
        system_fingerprint=stamp.fingerprint,
        choices=choices,
    )


async def _chat_events(
    stamp: _Stamp,
    streams: list[RequestStreamLike],
    readers: list[AnswerReader | None],
    with_logprobs: bool,
    include_usage: bool,
) -> AsyncIterator[bytes]:
    usages = [Usage() for _ in streams]
    async with merge(streams) as outputs:
        for i in range(len(streams)):
            first = ChatChunkChoice(index=i, delta=Delta(role="assistant", content=""))
            yield _encoder.encode(_chat_chunk(stamp, [first]))
        async for i, out in outputs:
            done = out.finish_reason is not None
            reader = readers[i]
            logprobs = _chat_logprobs(out.logprobs or []) if with_logprobs else None
            if reader is None:
                deltas = [Delta(content=out.text)] if out.text else []
            else:
                deltas = reader.push(out.text, final=done)
            if logprobs is not None and out.logprobs and not deltas:
                deltas = [Delta(content="")]
            for k, delta in enumerate(deltas):
                choice = ChatChunkChoice(
                    index=i, delta=delta, logprobs=logprobs if k == 0 else None
                )
                yield _encoder.encode(_chat_chunk(stamp, [choice]))
            if done:
                usages[i] = out.usage or usages[i]
                reason = finish_reason(out)
                if reader is not None:
                    reason = reader.finish_reason(reason)
                last = ChatChunkChoice(index=i, delta=Delta(), finish_reason=reason)
                chunk = _chat_chunk(stamp, [last])
                chunk.timings = timings(usages[i])
                yield _encoder.encode(chunk)
    if include_usage:
        chunk = _chat_chunk(stamp, [])
        chunk.usage = usage_info(usages, len(usages))
        yield _encoder.encode(chunk)


class _Offsets:
    """Running character offset of each choice's text, for the legacy ``text_offset``."""

    def __init__(self, starts: list[int]) -> None:
        self.at = starts

    def logprobs(self, index: int, items: Sequence[TokenLogprob]) -> CompletionLogprobs:
        tokens = [_text(lp.text) for lp in items]
        offsets = []
        for token in tokens:
            offsets.append(self.at[index])
            self.at[index] += len(token)
        return CompletionLogprobs(
            tokens=tokens,
            token_logprobs=[lp.logprob for lp in items],
            top_logprobs=[{_text(t.text): t.logprob for t in lp.top} for lp in items],
            text_offset=offsets,
        )


async def _completion_media(
    state: AppState, body: CompletionRequest
) -> tuple[list[Prompt], list[MediaInput]] | None:
    """A multimodal prompt (llama.cpp's object, or a text prompt beside multimodal_data) as
    its text and files; None for a text or token prompt without files."""
    multimodal = isinstance(body.prompt, MultimodalPrompt) or bool(body.multimodal_data)
    if multimodal and body.suffix is not None:
        raise InvalidRequestError("multimodal_data cannot be combined with suffix", param="suffix")
    with_media = await completion_media(state, body.prompt, body.multimodal_data)
    return None if with_media is None else ([with_media[0]], with_media[1])


async def _completion_prompts(state: AppState, body: CompletionRequest) -> list[Prompt]:
    if isinstance(body.prompt, MultimodalPrompt):
        return [body.prompt.prompt_string]
    prompts = prompt_list(body.prompt)
    if body.suffix is None:
        return prompts
    if not all(isinstance(p, str) for p in prompts):
        raise InvalidRequestError("suffix needs a text prompt", param="suffix")
    return [await infill_tokens(state, p, body.suffix) for p in prompts if isinstance(p, str)]


async def completions(req: Request, state: AppState) -> Response | StreamResponse:
    body = req.decode(_completion_request)
    state = await state.use_model(body.model)
    check_n(state, body.n)
    with_media = await _completion_media(state, body)
    prompts = with_media[0] if with_media else await _completion_prompts(state, body)
    template = await generate_template(
        state,
        body,
        req.request_id,
        max_tokens=max_tokens_from(("max_tokens", body.max_tokens)),
        logprobs=body.logprobs is not None,
        n_probs=body.logprobs,
    )
    if with_media:
        template = msgspec.structs.replace(template, media=with_media[1])
    streams = await submit(state, prompts, template, body.n, headers=req.headers)
    echoes = [""] * len(streams)
    if body.echo:
        texts = [p if isinstance(p, str) else await state.engine.detokenize(p) for p in prompts]
        echoes = [text for text in texts for _ in range(body.n)]
    stamp = _Stamp(state, "cmpl")
    offsets = _Offsets([len(e) for e in echoes]) if template.sampling.logprobs else None
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        events = _completion_events(stamp, streams, echoes, offsets, body.n, include_usage)
        return StreamResponse(sse.stream(events), sse.CONTENT_TYPE)
    results = await collect_all(streams)
    choices = [
        CompletionChoice(
            text=echoes[i] + r.text,
            index=i,
            logprobs=offsets.logprobs(i, r.logprobs) if offsets else None,
            finish_reason=r.finish_reason,
        )
        for i, r in enumerate(results)
    ]
    out = _completion(stamp, choices, usage_info([r.usage for r in results], body.n))
    out.timings = timings(results[0].usage)
    return json_response(out)


def _completion(
    stamp: _Stamp, choices: list[CompletionChoice], usage: UsageInfo | None = None
) -> Completion:
    out = Completion(
        id=stamp.id,
        created=stamp.created,
        model=stamp.model,
        system_fingerprint=stamp.fingerprint,
        choices=choices,
    )
    if usage is not None:
        out.usage = usage
    return out


async def _completion_events(
    stamp: _Stamp,
    streams: list[RequestStreamLike],
    echoes: list[str],
    offsets: _Offsets | None,
    n: int,
    include_usage: bool,
) -> AsyncIterator[bytes]:
    usages = [Usage() for _ in streams]
    async with merge(streams) as outputs:
        for i, echo in enumerate(echoes):
            if echo:
                yield _encoder.encode(_completion(stamp, [CompletionChoice(text=echo, index=i)]))
        async for i, out in outputs:
            done = out.finish_reason is not None
            if not (out.text or out.logprobs or done):
                continue
            choice = CompletionChoice(
                text=out.text,
                index=i,
                logprobs=offsets.logprobs(i, out.logprobs or []) if offsets else None,
                finish_reason=finish_reason(out) if done else None,
            )
            chunk = _completion(stamp, [choice])
            if done:
                usages[i] = out.usage or usages[i]
                chunk.timings = timings(usages[i])
            yield _encoder.encode(chunk)
    if include_usage:
        yield _encoder.encode(_completion(stamp, [], usage_info(usages, n)))


def _base64_f32(vector: list[float]) -> str:
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")


async def embeddings(req: Request, state: AppState) -> Response:
    body = req.decode(_embedding_request)
    state = await state.use_model(body.model)
    check_embeddings(state)
    results = await embed(state, prompt_list(body.input, "input"))
    as_base64 = body.encoding_format == "base64"
    data = [
        Embedding(
            index=i,
            embedding=_base64_f32(r.vector) if as_base64 else r.vector,
        )
        for i, r in enumerate(results)
    ]
    n_prompt = sum(r.n_tokens for r in results)
    return json_response(
        EmbeddingList(data=data, model=state.model_name, usage=EmbeddingUsage(n_prompt, n_prompt))
    )


def routes() -> list[Route[AppState]]:
    out: list[Route[AppState]] = []
    for prefix in ("/v1", ""):
        out += [
            Route(
                "POST",
                f"{prefix}/chat/completions",
                chat_completions,
                generates=True,
                picks_model=True,
            ),
            Route("POST", f"{prefix}/completions", completions, generates=True, picks_model=True),
            Route("POST", f"{prefix}/embeddings", embeddings, generates=True, picks_model=True),
        ]
    return out
