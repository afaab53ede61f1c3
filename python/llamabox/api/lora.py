"""GET/POST /lora-adapters: the loaded LoRA adapters and the server's scales (llama.cpp's).

``GET`` lists ``[{"id", "path", "scale"}]`` (ids in --lora, then --lora-scaled order); ``POST``
takes ``[{"id", "scale"}]`` and makes them the server's scales, the adapters not named off, for
requests from then on that give no ``lora`` of their own. A request's ``lora`` field (chat,
completions, /completion) sets its own. Requests under different scales are never batched into
one decode, and a cached prefix counts only for a request under the scales it was computed
with (its KV values depend on them). Embeddings keep the start-up scales.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

from llamabox.api.errors import APIError
from llamabox.api.http import Request, Response, Route, json_response
from llamabox.api.protocol import LoraScale
from llamabox.api.state import AppState

_decoder = msgspec.json.Decoder(Annotated[list[LoraScale], Meta(max_length=1024)])


def _require_adapters(state: AppState) -> None:
    if not state.config.engine.lora and not state.config.engine.lora_scaled:
        raise APIError(501, "This server has no LoRA adapters. Start it with `--lora FILE`")


async def list_adapters(req: Request, state: AppState) -> Response:
    _require_adapters(state)
    return json_response(state.engine.lora_adapters())


async def set_adapters(req: Request, state: AppState) -> Response:
    _require_adapters(state)
    body = req.decode(_decoder)
    state.engine.set_lora_scales([(entry.id, entry.scale) for entry in body])
    return json_response({"success": True, "adapters": state.engine.lora_adapters()})


def routes() -> list[Route[AppState]]:
    return [
        Route("GET", "/lora-adapters", list_adapters),
        Route("POST", "/lora-adapters", set_adapters),
    ]
