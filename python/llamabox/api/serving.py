"""From wire requests to engine requests and back, shared by the OpenAI, native and Ollama routes.

Inbound: prompts (chat template, token prompts, infill), sampling (server defaults overlaid with
what the request gives), stops, ``n`` fan-out. Outbound: collecting a stream into one answer,
merging ``n`` streams, usage and timings.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any, NamedTuple, TypeVar

import msgspec
import numpy as np

from llamabox.api.errors import APIError
from llamabox.api.pacing import PacedStream, request_rate
from llamabox.api.protocol import (
    ChatMessage,
    JSONObjectFormat,
    JSONSchemaFormat,
    LoraScale,
    PromptInput,
    PromptTokensDetails,
    SamplingFields,
    TextPart,
    Timings,
    UsageInfo,
    part_param,
)
from llamabox.api.state import AppState, RequestStreamLike
from llamabox.types import (
    GenerateRequest,
    GenerationOutput,
    InvalidRequestError,
    SamplingParams,
    SpeculativeOverride,
    TokenLogprob,
    Usage,
)

T = TypeVar("T")
Prompt = str | list[int]

ANY_JSON_OBJECT = '{"type": "object"}'


def message_dicts(
    messages: Iterable[ChatMessage], marker: str | None = None
) -> list[dict[str, Any]]:
    """OpenAI messages as the engine's template renderer takes them: text content, the text
    parts of a message joined by newlines; the legacy ``function`` role and ``function_call``
    as a tool message and a tool call. With a media ``marker`` (the engine's), a message with
    media keeps its parts, each media part a ``media_marker`` part (llama.cpp joins those into
    the text without newlines around them); without one, media parts are a 400."""
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        entry = msgspec.to_builtins(message)
        content = message.content
        if isinstance(content, list):
            texts = []
            parts: list[dict[str, str]] = []
            for j, part in enumerate(content):
                if isinstance(part, TextPart):
                    texts.append(part.text)
                    parts.append({"type": "text", "text": part.text})
                    continue
                if marker is None:
                    raise InvalidRequestError(
                        "media input needs a multimodal projector; this model has none (start "
                        "the server with --mmproj FILE)",
                        param=part_param(part, f"messages[{i}].content[{j}]"),
                    )
                parts.append({"type": "media_marker", "text": marker})
            entry["content"] = "\n".join(texts) if len(parts) == len(texts) else parts
        elif content is None and not (message.tool_calls or message.function_call):
            entry["content"] = ""
        if message.role == "developer":  # templates know "system"
            entry["role"] = "system"
        elif message.role == "function":  # legacy: a function's result
            entry["role"] = "tool"
            entry.setdefault("tool_call_id", message.name)
        if message.function_call is not None and not message.tool_calls:
            call = msgspec.to_builtins(message.function_call)
            entry["tool_calls"] = [{"id": call["name"], "type": "function", "function": call}]
        entry.pop("function_call", None)
        out.append({k: v for k, v in entry.items() if v is not None or k == "content"})
    return out


async def render_chat(state: AppState, messages: list[dict[str, Any]]) -> str:
    """The chat prompt (the engine leaves out a BOS text that tokenizing adds anyway)."""
    return await state.engine.apply_chat_template(messages, add_generation_prompt=True)


def prompt_list(value: PromptInput, param: str = "prompt") -> list[Prompt]:
    """A text, texts, a token list or token lists, as a list of prompts (one per choice group)."""
    if isinstance(value, str):
        return [value]
    if not value:
        raise InvalidRequestError(f"'{param}' is empty", param=param)
    if all(isinstance(item, str) for item in value):
        return [item for item in value if isinstance(item, str)]
    if all(isinstance(item, int) for item in value):
        return [[item for item in value if isinstance(item, int)]]
    if all(isinstance(item, list) for item in value):
        lists: list[Prompt] = [item for item in value if isinstance(item, list)]
        if any(not tokens for tokens in lists):
            raise InvalidRequestError(f"'{param}' has an empty token list", param=param)
        return lists
    raise InvalidRequestError(
        f"'{param}' must be a string, a list of strings, a token list or a list of token lists",
        param=param,
    )


async def infill_tokens(
    state: AppState, prefix: str, suffix: str, middle: str = "", extra: str = ""
) -> list[int]:
    """Fill-in-the-middle prompt: [BOS] extra PRE prefix SUF suffix MID middle."""
    fim = state.engine.fim_tokens()
    if fim is None:
        raise APIError(400, "Infill is not supported by this model: it has no FIM tokens")
    tok_pre, tok_suf, tok_mid = fim

    async def text(s: str) -> list[int]:
        return await state.engine.tokenize(s, add_special=False, parse_special=False)

    bos = await state.engine.tokenize("", add_special=True, parse_special=False)  # if any
    tokens = [*bos, *await text(extra), tok_pre, *await text(prefix), tok_suf]
    return [*tokens, *await text(suffix), tok_mid, *await text(middle)]


def overlay(
    defaults: SamplingParams,
    *,
    grammar: str | None = None,
    json_schema: str | None = None,
    **given: Any,
) -> SamplingParams:
    """``defaults`` with every field that ``given`` sets to something other than None.

    A request's own output constraint (a grammar or a JSON schema) replaces the server's
    default constraint, whichever kind either is.
    """
    fields = {k: v for k, v in given.items() if v is not None}
    if grammar is not None or json_schema is not None:
        fields["grammar"] = grammar
        fields["json_schema"] = json_schema
    return msgspec.structs.replace(defaults, **fields)


async def sampling_from(
    state: AppState, fields: SamplingFields, *, logprobs: bool = False, n_probs: int | None = None
) -> SamplingParams:
    """The request's sampling over the server's defaults (``config.sampling``)."""
    temperature = fields.temperature
    if temperature is not None and temperature < 0:  # llama.cpp: negative means greedy
        temperature = 0.0
    n_top = n_probs if n_probs is not None else fields.n_probs
    return overlay(
        state.config.sampling,
        temperature=temperature,
        top_p=fields.top_p,
        top_k=fields.top_k,
        min_p=fields.min_p,
        typical_p=fields.typical_p,
        repeat_penalty=fields.repeat_penalty,
        repeat_last_n=fields.repeat_last_n,
        presence_penalty=fields.presence_penalty,
        frequency_penalty=fields.frequency_penalty,
        seed=fields.seed,
        ignore_eos=fields.ignore_eos,
        grammar=fields.grammar,
        json_schema=json_schema_text(fields),
        logit_bias=await logit_bias(state, fields.logit_bias) if fields.logit_bias else None,
        logprobs=True if (logprobs or n_top) else None,
        n_probs=n_top,
    )


def json_schema_text(fields: SamplingFields) -> str | None:
    """The JSON schema constraining the output, from ``json_schema`` or ``response_format``."""
    schema: msgspec.Raw | None = None
    if len(fields.json_schema):
        schema = fields.json_schema
    elif isinstance(fields.response_format, JSONSchemaFormat):
        schema = fields.response_format.json_schema.schema
        if not len(schema):
            raise InvalidRequestError(
                "response_format.json_schema.schema is required",
                param="response_format.json_schema.schema",
            )
    elif isinstance(fields.response_format, JSONObjectFormat):
        schema = fields.response_format.schema
        if not len(schema):
            return ANY_JSON_OBJECT
    if schema is None:
        return None
    if fields.grammar:
        raise InvalidRequestError("give either a grammar or a JSON schema, not both", "grammar")
    return raw_schema_text(schema, "json_schema")


def raw_schema_text(schema: msgspec.Raw, param: str) -> str | None:
    """A schema given as a JSON object, or as a string holding one."""
    try:
        text = bytes(schema).decode()
    except UnicodeDecodeError:  # msgspec passes a Raw's bytes on unchecked
        raise InvalidRequestError("the JSON schema is not valid UTF-8", param=param) from None
    stripped = text.lstrip()
    if stripped.startswith('"'):
        text = msgspec.json.decode(text, type=str)
        stripped = text.lstrip()
    if stripped in ("", "null"):
        return None
    if not stripped.startswith(("{", "true")):
        raise InvalidRequestError("a JSON schema must be an object", param=param)
    return text


_TOKEN_ID = re.compile(r"-?[0-9]+")  # ASCII only: str.isdigit() also takes "²", int() not


async def logit_bias(state: AppState, given: Any) -> dict[int, float]:
    """Token id -> bias from OpenAI's ``{"id": bias}`` or llama.cpp's ``[[id or text, bias]]``.

    Text keys bias every token of their tokenization; a bias of ``false`` bans the token. Ids
    outside the vocabulary are the engine's to refuse.
    """
    pairs = given.items() if isinstance(given, dict) else given
    out: dict[int, float] = {}
    for key, value in pairs:
        if value is True:  # llama.cpp: true leaves the token alone
            continue
        bias = -math.inf if value is False else float(value)
        if isinstance(key, int) or (isinstance(key, str) and _TOKEN_ID.fullmatch(key)):
            out[int(key)] = bias
        else:
            for token in await state.engine.tokenize(key, add_special=False, parse_special=False):
                out[token] = bias
    return out


def stop_list(stop: str | list[str] | None) -> list[str]:
    if not stop:
        return []
    if isinstance(stop, str):
        return [stop]
    return [s for s in stop if s]


def max_tokens_from(*given: tuple[str, int | None]) -> int | None:
    """The first limit given, as ``(field, value)`` pairs; -1 (or none given) leaves it to the
    server's default. 0 is refused, as OpenAI does."""
    for param, value in given:
        if value is not None:
            if value == 0:
                raise InvalidRequestError(f"{param} must be at least 1 (or -1: no limit)", param)
            return None if value < 0 else value
    return None


def check_n(state: AppState, n: int) -> None:
    n_slots = state.config.engine.n_parallel
    if not 1 <= n <= n_slots:
        raise InvalidRequestError(f"n must be between 1 and {n_slots} (the slots)", param="n")


async def generate_template(
    state: AppState,
    fields: SamplingFields,
    request_id: str,
    *,
    max_tokens: int | None,
    logprobs: bool = False,
    n_probs: int | None = None,
) -> GenerateRequest:
    """A GenerateRequest for the request's fields, its prompt still to be filled in."""
    return GenerateRequest(
        prompt="",
        max_tokens=max_tokens,
        stop=stop_list(fields.stop),
        sampling=await sampling_from(state, fields, logprobs=logprobs, n_probs=n_probs),
        cache_prompt=fields.cache_prompt is not False,
        speculative=speculative_from(fields),
        lora=lora_from(fields.lora),
        request_id=request_id,
    )


def lora_from(lora: list[LoraScale] | None) -> list[tuple[int, float]] | None:
    """A request's adapter scales, or None (the engine checks the ids)."""
    return None if lora is None else [(entry.id, entry.scale) for entry in lora]


def speculative_from(fields: SamplingFields) -> SpeculativeOverride | None:
    """The request's speculative settings: the ``speculative`` object, or llama.cpp's flat
    ``speculative_n_max`` etc. (the object wins)."""
    spec = fields.speculative
    flat = (fields.speculative_n_max, fields.speculative_n_min, fields.speculative_p_min)
    if spec is None and all(v is None for v in flat):
        return None
    n_max = spec.n_max if spec and spec.n_max is not None else fields.speculative_n_max
    n_min = spec.n_min if spec and spec.n_min is not None else fields.speculative_n_min
    p_min = spec.p_min if spec and spec.p_min is not None else fields.speculative_p_min
    return SpeculativeOverride(
        n_max=n_max, n_min=n_min, p_min=p_min, type=spec.type if spec else None
    )


def check_batch(state: AppState, n_requests: int, param: str) -> None:
    """More requests at once than slots and queue hold together could never be taken: 400, not
    the 503 of a queue that is full for now."""
    engine = state.config.engine
    most = engine.n_parallel + engine.n_queue_max
    if n_requests > most:
        raise InvalidRequestError(
            f"one request of {n_requests} inputs (times n), more than this server takes at once"
            f" ({most}: its slots and queue)",
            param=param,
        )


async def submit(
    state: AppState,
    prompts: Sequence[Prompt],
    template: GenerateRequest,
    n: int = 1,
    *,
    headers: dict[str, str] | None = None,
) -> list[RequestStreamLike]:
    """``n`` choices of each prompt (each prompt tokenized once; with a seed, choice j samples
    with seed + j). All or none: a rejection cancels the ones already submitted, then
    propagates. With -tps, each stream is delivered at the request's rate (``headers``:
    X-Request-Tokens-Per-Second)."""
    check_batch(state, len(prompts) * n, "prompt")
    rate = request_rate(state, headers or {})
    streams: list[RequestStreamLike] = []
    try:
        for prompt in prompts:
            request = msgspec.structs.replace(template, prompt=prompt)
            streams += await state.engine.generate_choices(request, n)
    except BaseException:
        for stream in streams:
            stream.cancel()
        raise
    if rate is not None:
        return [PacedStream(stream, rate) for stream in streams]
    return streams


class Collected:
    """One request's outputs put together."""

    __slots__ = ("finish_reason", "logprobs", "stop_word", "text_parts", "token_ids", "usage")

    def __init__(self) -> None:
        self.text_parts: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.finish_reason = "stop"
        self.stop_word: str | None = None
        self.usage = Usage()

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    def add(self, out: GenerationOutput) -> None:
        if out.text:
            self.text_parts.append(out.text)
        self.token_ids += out.token_ids
        if out.logprobs:
            self.logprobs += out.logprobs
        if out.finish_reason is not None:
            self.finish_reason = finish_reason(out)
            self.stop_word = out.stop_word
        if out.usage is not None:
            self.usage = out.usage


def finish_reason(out: GenerationOutput) -> str:
    return "length" if out.finish_reason == "length" else "stop"


async def collect(stream: RequestStreamLike) -> Collected:
    collected = Collected()
    async for out in stream:
        collected.add(out)
    return collected


async def collect_all(streams: list[RequestStreamLike]) -> list[Collected]:
    """Every stream collected; on failure or cancellation all of them are cancelled."""
    try:
        if len(streams) == 1:
            return [await collect(streams[0])]
        return await gather_or_cancel([collect(stream) for stream in streams])
    finally:
        for stream in streams:
            stream.cancel()


async def gather_or_cancel(awaitables: Sequence[Awaitable[T]]) -> list[T]:
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()


async def _next_or_none(stream: RequestStreamLike) -> GenerationOutput | None:
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return None


@asynccontextmanager
async def merge(
    streams: list[RequestStreamLike],
) -> AsyncIterator[AsyncIterator[tuple[int, GenerationOutput]]]:
    """``(index, output)`` pairs as they come from all streams.

    A context manager, so that however the consumer ends (done, failed, cancelled, closed
    early), every stream is cancelled and no read is left pending.
    """
    merged = _merged(streams)
    try:
        yield merged
    finally:
        await merged.aclose()
        for stream in streams:
            stream.cancel()


async def _merged(
    streams: list[RequestStreamLike],
) -> AsyncGenerator[tuple[int, GenerationOutput], None]:
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    pending = {asyncio.ensure_future(_next_or_none(s)): i for i, s in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=pending.__getitem__):
                index = pending.pop(task)
                result = task.result()
                if result is None:
                    continue
                yield index, result
                if result.finish_reason is None:
                    pending[asyncio.ensure_future(_next_or_none(streams[index]))] = index
    finally:
        for task in pending:
            task.cancel()


def usage_info(usages: Sequence[Usage], n: int = 1) -> UsageInfo:
    """Usage of a fan-out: each prompt counted once (its first choice), completions summed."""
    firsts = usages[::n]
    prompt = sum(u.prompt_tokens for u in firsts)
    completion = sum(u.completion_tokens for u in usages)
    cached = sum(u.cached_tokens for u in firsts)
    return UsageInfo(prompt, completion, prompt + completion, PromptTokensDetails(cached))


def _per(n: int, ms: float) -> tuple[float, float]:
    """(ms per token, tokens per second)"""
    if n <= 0 or ms <= 0:
        return 0.0, 0.0
    return ms / n, 1e3 * n / ms


def timings(usage: Usage) -> Timings:
    prompt_n = max(usage.prompt_tokens - usage.cached_tokens, 0)
    prompt_per_token, prompt_per_second = _per(prompt_n, usage.prompt_ms)
    gen_per_token, gen_per_second = _per(usage.completion_tokens, usage.generation_ms)
    out = Timings(
        cache_n=usage.cached_tokens,
        prompt_n=prompt_n,
        prompt_ms=usage.prompt_ms,
        prompt_per_token_ms=prompt_per_token,
        prompt_per_second=prompt_per_second,
        predicted_n=usage.completion_tokens,
        predicted_ms=usage.generation_ms,
        predicted_per_token_ms=gen_per_token,
        predicted_per_second=gen_per_second,
    )
    if usage.drafted_tokens:
        out.draft_n = usage.drafted_tokens
        out.draft_n_accepted = usage.accepted_tokens
    return out


def check_embeddings(state: AppState) -> None:
    if state.config.engine.rerank:
        raise APIError(
            501,
            "This server reranks (--rerank): its model pools into relevance scores, not "
            "embeddings. POST /v1/rerank, or serve an embedding model with `--embeddings`",
        )
    if not state.config.engine.embeddings:
        raise APIError(501, "This server does not support embeddings. Start it with `--embeddings`")


class Pooled(NamedTuple):
    vector: list[float]
    n_tokens: int


async def embed(state: AppState, inputs: list[Prompt]) -> list[Pooled]:
    """Pooled embeddings (the engine L2-normalizes them, as llama.cpp's server does)."""
    check_embeddings(state)
    check_batch(state, len(inputs), "input")
    empty = next((i for i, p in enumerate(inputs) if not p), None)
    if empty is not None:  # as OpenAI: no vector for nothing (it would be the BOS token's)
        raise InvalidRequestError(f"input {empty} is empty", param="input")
    texts = [p for p in inputs if isinstance(p, str)]
    token_lists = [p for p in inputs if isinstance(p, list)]
    results = await state.engine.embed(texts if texts else token_lists)
    out: list[Pooled] = []
    for result in results:
        vector = np.asarray(result.embedding, dtype=np.float64)
        if vector.ndim != 1:
            raise InvalidRequestError(
                "pooling 'none' gives one vector per token; start the server with another "
                "--pooling for this endpoint",
                param="input",
            )
        out.append(Pooled(vector.tolist(), result.prompt_tokens))
    return out
