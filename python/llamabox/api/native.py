"""llama.cpp / LLaMA Box endpoints: /props, /slots, /tokenize, /detokenize, /apply-template,
/completion and /infill. (/health is the app's, /metrics is in ``metrics``.)

Disabled features answer 501 as llama.cpp does: /slots with ``slots=False``, /infill with
``infill=False``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import msgspec

from llamabox import _core
from llamabox.api import sse
from llamabox.api.errors import APIError
from llamabox.api.http import Request, Response, Route, StreamResponse, json_response
from llamabox.api.media import LLAMA_CPP_MARKER, completion_media
from llamabox.api.protocol import (
    ApplyTemplateRequest,
    ApplyTemplateResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    InfillRequest,
    MultimodalPrompt,
    NativeCompletion,
    NativeCompletionRequest,
    NativeTokenProb,
    NativeTopProb,
    Props,
    SlotView,
    TokenizeRequest,
    TokenizeResponse,
    TokenPiece,
)
from llamabox.api.serving import (
    Collected,
    Prompt,
    collect_all,
    generate_template,
    infill_tokens,
    max_tokens_from,
    message_dicts,
    render_chat,
    submit,
    timings,
)
from llamabox.api.state import VERSION, AppState, RequestStreamLike
from llamabox.types import InvalidRequestError, MediaInput, TokenLogprob

__all__ = ["routes"]

_completion_request = msgspec.json.Decoder(NativeCompletionRequest)
_infill_request = msgspec.json.Decoder(InfillRequest)
_tokenize_request = msgspec.json.Decoder(TokenizeRequest)
_detokenize_request = msgspec.json.Decoder(DetokenizeRequest)
_template_request = msgspec.json.Decoder(ApplyTemplateRequest)
_encoder = msgspec.json.Encoder()


def _system_info() -> dict[str, Any]:
    return dict(_core.system_info())  # microseconds: memory figures stay current


# llama.cpp's LLAMA_DEFAULT_SEED: what its /props shows for "a random seed per request"
_RANDOM_SEED = 0xFFFFFFFF


def _default_params(state: AppState) -> dict[str, Any]:
    """What a request that sets nothing gets, with llama-server's names for the fields: the
    server's sampling defaults, its seed, its token limit."""
    config = state.config
    sampling = config.sampling
    params: dict[str, Any] = {f: getattr(sampling, f) for f in sampling.__struct_fields__}
    seed = sampling.seed if sampling.seed is not None else config.engine.seed
    params.update(
        seed=_RANDOM_SEED if seed < 0 else seed,
        n_predict=config.engine.n_predict,
        max_tokens=config.engine.n_predict,
        stop=[],
        stream=False,
        grammar=sampling.grammar or "",
        json_schema=sampling.json_schema or "",
        logit_bias=[[token, bias] for token, bias in sampling.logit_bias.items()],
        n_keep=0,
    )
    return params


async def props(req: Request, state: AppState) -> Response:
    info = state.engine.model_info
    config = state.config
    settings = {
        "n_ctx": info.n_ctx_slot,
        "n_predict": config.engine.n_predict,
        "model": state.model_name,
        "params": _default_params(state),
    }
    system = _system_info()
    spec = config.engine.speculative
    if spec.enabled:
        settings["speculative"] = {
            "types": spec.types or ["draft-simple"],
            "n_max": spec.n_max,
            "n_min": spec.n_min,
            "p_min": spec.p_min,
            "adaptive": spec.adaptive,
            "draft_model": spec.draft_model,
        }
    return json_response(
        Props(
            default_generation_settings=settings,
            total_slots=config.engine.n_parallel,
            model_path=info.path,
            model_alias=state.model_name,
            chat_template=info.chat_template,
            chat_template_caps=info.chat_template_caps,
            bos_token=info.bos_token,
            eos_token=info.eos_token,
            build_info=f"llamabox {VERSION} ({system['backend']}, {system['llama_cpp_build']})",
            system_info=system,
            modalities={"vision": info.vision, "audio": info.audio},
            media_marker=state.engine.media_marker or msgspec.UNSET,
            embeddings=config.engine.embeddings,
            infill=config.infill and info.has_fim,
        )
    )


async def slots(req: Request, state: AppState) -> Response:
    if not state.config.slots:
        raise APIError(
            501, "This server does not support slots endpoint. Start it without `--no-slots`"
        )
    speculative = state.config.engine.speculative.enabled
    views = [
        SlotView(
            id=s.id,
            id_task=s.request_id,
            n_ctx=s.n_ctx,
            state=s.state,
            is_processing=s.state != 0,
            n_cached=s.n_cached,
            n_prompt_tokens=s.n_prompt,
            n_decoded=s.n_decoded,
            speculative=speculative,
            n_draft_total=s.n_drafted,
            n_draft_accepted=s.n_accepted,
            draft_acceptance=s.draft_acceptance,
        )
        for s in state.engine.stats().slots
    ]
    if req.query.get("fail_on_no_slot") in ("1", "true") and all(v.is_processing for v in views):
        raise APIError(503, "no slot available")
    return json_response(views)


async def tokenize(req: Request, state: AppState) -> Response:
    body = req.decode(_tokenize_request)
    state = await state.use_model(body.model, touch=False)
    tokens = await state.engine.tokenize(body.content, body.add_special, body.parse_special)
    if not body.with_pieces:
        return json_response(TokenizeResponse(tokens))
    pieces = state.engine.token_pieces(tokens)
    return json_response(
        TokenizeResponse([TokenPiece(t, _piece(p)) for t, p in zip(tokens, pieces, strict=True)])
    )


def _piece(piece: bytes) -> str | list[int]:
    try:
        return piece.decode("utf-8")
    except UnicodeDecodeError:
        return list(piece)


async def detokenize(req: Request, state: AppState) -> Response:
    body = req.decode(_detokenize_request)
    state = await state.use_model(body.model, touch=False)
    return json_response(DetokenizeResponse(await state.engine.detokenize(body.tokens)))


async def apply_template(req: Request, state: AppState) -> Response:
    body = req.decode(_template_request)
    state = await state.use_model(body.model, touch=False)
    mark = state.engine.media_marker
    prompt = await render_chat(state, message_dicts(body.messages, mark))
    if mark is not None:  # shown as llama.cpp writes it
        prompt = prompt.replace(mark, LLAMA_CPP_MARKER)
    return json_response(ApplyTemplateResponse(prompt))


async def _prompt(state: AppState, prompt: str | list[str | int]) -> Prompt:
    """Text, or tokens with text pieces spliced in (only the first piece gets a BOS)."""
    if isinstance(prompt, str):
        return prompt
    tokens: list[int] = []
    for i, piece in enumerate(prompt):
        if isinstance(piece, int):
            tokens.append(piece)
        else:
            tokens += await state.engine.tokenize(piece, add_special=i == 0, parse_special=True)
    return tokens


async def completion(req: Request, state: AppState) -> Response | StreamResponse:
    body = req.decode(_completion_request)
    state = await state.use_model(body.model)
    with_media = await completion_media(state, body.prompt, body.multimodal_data)
    if with_media is not None:
        return await _generate(req, state, body, *with_media)
    if isinstance(body.prompt, MultimodalPrompt):  # its files were empty
        return await _generate(req, state, body, body.prompt.prompt_string)
    return await _generate(req, state, body, await _prompt(state, body.prompt))


async def infill(req: Request, state: AppState) -> Response | StreamResponse:
    if not state.config.infill:
        raise APIError(501, "This server does not support infill. Start it with `--infill`")
    body = req.decode(_infill_request)
    if not isinstance(body.prompt, str):
        raise InvalidRequestError("infill takes the prompt as text", param="prompt")
    state = await state.use_model(body.model)
    extra = "".join(f"{e.filename}\n{e.text}\n" for e in body.input_extra)
    tokens = await infill_tokens(state, body.input_prefix, body.input_suffix, body.prompt, extra)
    return await _generate(req, state, body, tokens)


async def _generate(
    req: Request,
    state: AppState,
    body: NativeCompletionRequest,
    prompt: Prompt,
    media: list[MediaInput] | None = None,
) -> Response | StreamResponse:
    template = await generate_template(
        state,
        body,
        req.request_id,
        max_tokens=max_tokens_from(("n_predict", body.n_predict), ("max_tokens", body.max_tokens)),
        n_probs=body.n_probs,
    )
    if media:
        template = msgspec.structs.replace(template, media=media)
    streams = await submit(state, [prompt], template, headers=req.headers)
    view = _View(state, body.return_tokens, template.sampling.logprobs)
    if body.stream:
        return StreamResponse(sse.stream(_events(view, streams[0]), done=False), sse.CONTENT_TYPE)
    [result] = await collect_all(streams)
    return json_response(view.final(result.text, result))


class _View:
    """How this request's outputs are shown: with tokens, with probabilities."""

    def __init__(self, state: AppState, with_tokens: bool, with_probs: bool) -> None:
        self.model = state.model_name
        self.with_tokens = with_tokens
        self.with_probs = with_probs

    def chunk(
        self, text: str, tokens: list[int], probs: Sequence[TokenLogprob]
    ) -> NativeCompletion:
        out = NativeCompletion(content=text, stop=False)
        if self.with_tokens:
            out.tokens = tokens
        if self.with_probs:
            out.completion_probabilities = [_prob(lp) for lp in probs]
        return out

    def final(self, text: str, result: Collected) -> NativeCompletion:
        usage = result.usage
        out = self.chunk(text, result.token_ids if text else [], result.logprobs if text else [])
        out.stop = True
        out.model = self.model
        out.tokens_predicted = usage.completion_tokens
        out.tokens_evaluated = usage.prompt_tokens
        out.tokens_cached = usage.cached_tokens
        out.stop_type = _stop_type(result)
        out.stopping_word = result.stop_word or ""
        out.truncated = False
        out.has_new_line = "\n" in result.text
        out.timings = timings(usage)
        return out


def _stop_type(result: Collected) -> str:
    if result.finish_reason == "length":
        return "limit"
    return "word" if result.stop_word else "eos"


def _prob(lp: TokenLogprob) -> NativeTokenProb:
    return NativeTokenProb(
        id=lp.token,
        token=lp.text.decode("utf-8", "replace"),
        bytes=list(lp.text),
        logprob=lp.logprob,
        top_logprobs=[
            NativeTopProb(
                id=t.token,
                token=t.text.decode("utf-8", "replace"),
                bytes=list(t.text),
                logprob=t.logprob,
            )
            for t in lp.top
        ],
    )


async def _events(view: _View, stream: RequestStreamLike) -> AsyncIterator[bytes]:
    result = Collected()
    try:
        async for out in stream:
            result.add(out)
            if out.text or out.token_ids:
                yield _encoder.encode(view.chunk(out.text, out.token_ids, out.logprobs or []))
    finally:
        stream.cancel()
    yield _encoder.encode(view.final("", result))


def routes() -> list[Route[AppState]]:
    return [
        Route("GET", "/props", props),
        Route("GET", "/slots", slots, autoload=False),  # monitoring never loads a model
        Route("POST", "/tokenize", tokenize, picks_model=True),
        Route("POST", "/detokenize", detokenize, picks_model=True),
        Route("POST", "/apply-template", apply_template, picks_model=True),
        Route("POST", "/completion", completion, generates=True, picks_model=True),
        Route("POST", "/infill", infill, generates=True, picks_model=True),
    ]
