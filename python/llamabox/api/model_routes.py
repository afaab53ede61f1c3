"""The models a server serves, and llama-server's router's control of them: the cards of
``GET /v1/models`` (and ``/models``) with each model's state, ``POST /models/load`` and
``POST /models/unload`` (``{"model": NAME}`` → ``{"success": true}``).
"""

from __future__ import annotations

import msgspec

from llamabox.api.errors import APIError
from llamabox.api.http import Request, Response, Route, json_response
from llamabox.api.models_registry import ModelEntry
from llamabox.api.protocol import (
    ModelActionRequest,
    ModelActionResult,
    ModelCard,
    ModelList,
    ModelMeta,
    ModelStatus,
)
from llamabox.api.state import AppState
from llamabox.types import ModelInfo

__all__ = ["model_card", "routes"]

_action_request = msgspec.json.Decoder(ModelActionRequest)


def model_card(state: AppState, entry: ModelEntry) -> ModelCard:
    card = ModelCard(id=entry.name, created=state.created)
    if entry.config.tags:
        card.tags = list(entry.config.tags)
    info = entry.engine.model_info if entry.engine.is_loaded else entry.info
    if info is not None:
        card.meta = ModelMeta(
            n_vocab=info.n_vocab,
            n_ctx_train=info.n_ctx_train,
            n_embd=info.n_embd,
            n_params=info.n_params,
            size=info.size_bytes,
        )
    if entry.spec.aliases:
        card.aliases = list(entry.spec.aliases)
    card.capabilities = _capabilities(entry, info)
    seconds = entry.load_seconds
    progress = entry.engine.load_progress if entry.status == "loading" else None
    status = ModelStatus(
        value=entry.status,
        load_seconds=None if seconds is None else round(seconds, 3),
        progress=None if progress is None else round(progress, 3),
    )
    if entry.error is not None and status.value == "unloaded":
        status.failed, status.error = True, entry.error
    card.status = status
    return card


def _capabilities(entry: ModelEntry, info: ModelInfo | None) -> list[str]:
    caps = ["completion", "embedding"] if entry.config.engine.embeddings else ["completion"]
    if info is not None and entry.engine.is_loaded:
        caps += [name for name, on in (("vision", info.vision), ("audio", info.audio)) if on]
    elif entry.config.engine.mmproj:
        caps.append("vision")
    return caps


def _named(state: AppState, name: str) -> ModelEntry:
    """The model ``name`` names exactly (a request's generation takes any name when the
    server has one model; these routes do not)."""
    if not state.models.exists(name):
        raise APIError(
            404, f"The model '{name}' does not exist", param="model", code="model_not_found"
        )
    return state.models.find(name)


async def list_models(req: Request, state: AppState) -> Response:
    return json_response(ModelList(data=[model_card(state, e) for e in state.models.entries]))


async def get_model(req: Request, state: AppState) -> Response:
    return json_response(model_card(state, _named(state, req.path_params["model_id"])))


async def load(req: Request, state: AppState) -> Response:
    body = req.decode(_action_request)
    state.models.start_load(_named(state, body.model))
    return json_response(ModelActionResult())


async def unload(req: Request, state: AppState) -> Response:
    body = req.decode(_action_request)
    await state.models.unload(_named(state, body.model))
    return json_response(ModelActionResult())


def routes() -> list[Route[AppState]]:
    out: list[Route[AppState]] = []
    for prefix in ("/v1", ""):
        out += [
            # One model: 503 while it loads (a listed model is one a client may use). Several:
            # each card says its state.
            Route("GET", f"{prefix}/models", list_models, picks_model=True),
            Route("GET", f"{prefix}/models/{{model_id}}", get_model, picks_model=True),
        ]
    out += [
        Route("POST", "/models/load", load, picks_model=True),
        Route("POST", "/models/unload", unload, picks_model=True),
    ]
    return out
