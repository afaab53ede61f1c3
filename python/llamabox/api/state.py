"""What every route shares: the config, the engine (as the interface the routes rely on), names."""

from __future__ import annotations

import copy
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

from llamabox._version import installed_version
from llamabox.api.models_registry import EngineFactory, ModelRegistry
from llamabox.config import ServerConfig
from llamabox.types import (
    EmbeddingResult,
    EngineConfig,
    EngineStats,
    GenerateRequest,
    GenerationOutput,
    LoraAdapter,
    ModelInfo,
    RerankResult,
)

__all__ = [
    "AppState",
    "ChatParserLike",
    "ChatRenderLike",
    "EngineLike",
    "RequestStreamLike",
    "VERSION",
]


VERSION = installed_version("0.0.0+local")


class RequestStreamLike(Protocol):
    """One request's outputs; the last has ``finish_reason`` and ``usage``."""

    def __aiter__(self) -> AsyncIterator[GenerationOutput]: ...

    async def __anext__(self) -> GenerationOutput: ...

    def cancel(self) -> None: ...

    def keep_outputs(self) -> None:
        """From now on, outputs the reader has not taken are kept apart, not merged."""
        ...


class ChatRenderLike(Protocol):
    """A chat rendered through the template (``_core.ChatRender``)."""

    @property
    def prompt(self) -> str: ...
    @property
    def grammar(self) -> str: ...
    @property
    def grammar_lazy(self) -> bool: ...
    @property
    def grammar_triggers(self) -> list[tuple[int, str]]: ...
    @property
    def preserved_tokens(self) -> list[str]: ...
    @property
    def additional_stops(self) -> list[str]: ...
    @property
    def generation_prompt(self) -> str: ...
    @property
    def parses(self) -> bool: ...


class ChatDeltaLike(Protocol):
    @property
    def reasoning(self) -> str: ...
    @property
    def content(self) -> str: ...
    @property
    def tool_index(self) -> int: ...
    @property
    def tool_id(self) -> str: ...
    @property
    def tool_name(self) -> str: ...
    @property
    def tool_arguments(self) -> str: ...


class ChatToolCallLike(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def arguments(self) -> str: ...


class ChatMessageLike(Protocol):
    @property
    def content(self) -> str: ...
    @property
    def reasoning_content(self) -> str: ...
    @property
    def tool_calls(self) -> Sequence[ChatToolCallLike]: ...


class ChatParserLike(Protocol):
    """Reads an answer into content, reasoning and tool calls (``_core.ChatParser``)."""

    def push(self, text: str, is_final: bool = False) -> Sequence[ChatDeltaLike]: ...

    @property
    def message(self) -> ChatMessageLike: ...


class EngineLike(Protocol):
    """The part of ``llamabox.engine.Engine`` the HTTP layer uses."""

    @property
    def config(self) -> EngineConfig: ...

    @property
    def is_loaded(self) -> bool: ...

    @property
    def load_progress(self) -> float | None:
        """While the model loads, the share of its weights read (0..1); else None."""
        ...

    @property
    def failure(self) -> str | None:
        """Why the loaded engine can no longer generate (a lost RPC server), else None."""
        ...

    @property
    def model_info(self) -> ModelInfo: ...

    @property
    def media_marker(self) -> str | None:
        """What marks a media input's place in a text prompt; None without a projector."""
        ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def generate_choices(
        self, request: GenerateRequest, n: int
    ) -> Sequence[RequestStreamLike]: ...

    async def embed(self, inputs: list[str] | list[list[int]]) -> list[EmbeddingResult]: ...

    async def rerank(self, query: str, documents: Sequence[str]) -> list[RerankResult]: ...

    def lora_adapters(self) -> list[LoraAdapter]: ...

    def set_lora_scales(self, scales: Sequence[tuple[int, float]]) -> None: ...

    async def tokenize(
        self, text: str, add_special: bool = True, parse_special: bool = True
    ) -> list[int]: ...

    async def detokenize(self, tokens: list[int]) -> str: ...

    def token_pieces(self, tokens: list[int]) -> list[bytes]: ...

    async def slot_action(self, id_slot: int, action: str, path: str = "") -> dict[str, Any]: ...

    async def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True
    ) -> str: ...

    async def apply_chat(self, inputs: dict[str, Any]) -> ChatRenderLike: ...

    def chat_parser(self, render: object) -> ChatParserLike: ...

    def fim_tokens(self) -> tuple[int, int, int] | None: ...

    def stats(self) -> EngineStats: ...


class AppState:
    """What the routes share. ``engine``, ``config`` and ``model_name`` are the default model's;
    :meth:`use_model` gives a request the state of the model it asks for."""

    def __init__(
        self,
        config: ServerConfig,
        engine: EngineLike,
        engine_factory: EngineFactory | None = None,
    ) -> None:
        self.config = config
        self.engine = engine
        self.model_name = config.model_name
        self.created = int(time.time())
        self.fingerprint = f"llamabox-{VERSION}"
        self.load_error: BaseException | None = None
        self.models = ModelRegistry(config, engine, engine_factory)

    async def use_model(
        self,
        name: str | None,
        *,
        keep_alive: float | None = None,
        autoload: bool = True,
        touch: bool = True,
    ) -> AppState:
        """The state as the model ``name`` picks sees it (its engine, config and name), the
        model loaded and leased until the request ends (``ModelRegistry.acquire``). One model
        without --models-dir / --models-config: this state, whatever the name (the app has
        checked that it is loaded)."""
        if self.models.single:
            return self
        entry = self.models.find(name)
        await self.models.acquire(entry, keep_alive=keep_alive, autoload=autoload, touch=touch)
        if entry is self.models.default:
            return self
        view = copy.copy(self)
        view.engine = entry.engine
        view.config = entry.config
        view.model_name = entry.name
        return view
