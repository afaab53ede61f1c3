"""Server configuration: what `llamabox serve` parses from flags and LLAMA_ARG_* variables."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from llamabox.types import EngineConfig, SamplingParams


class ModelConfig(msgspec.Struct, kw_only=True):
    """One model of several (--models-dir, --models-config): its name and its own settings."""

    name: str  # the `model` that picks it on the wire
    aliases: list[str] = []  # other names that pick it
    engine: EngineConfig
    sampling: SamplingParams = msgspec.field(default_factory=SamplingParams)  # request defaults
    ttl: float | None = None  # idle seconds before it is unloaded; None: --models-ttl; <= 0: never
    load_on_startup: bool = False


class ServerConfig(msgspec.Struct, kw_only=True):
    engine: EngineConfig
    alias: str | None = None  # model name on the wire; default: the model file's stem
    host: str = "127.0.0.1"
    port: int = 8080
    api_keys: list[str] = []  # empty: no authentication
    metrics: bool = False  # GET /metrics
    slots: bool = True  # GET /slots
    infill: bool = True  # POST /infill
    timeout: float = 600.0  # seconds: request read/write and graceful-shutdown bound
    log_format: Literal["text", "json"] = "text"
    verbose: bool = False
    cors_origins: list[str] = []  # empty: no CORS headers
    max_body_bytes: int = 32 * 1024 * 1024
    # -tps: each request's output delivered at most this many tokens a second (0: no limit;
    # -1: no server limit, but a request's X-Request-Tokens-Per-Second header is honoured).
    tokens_per_second: int = 0
    tags: list[str] = []  # --tags: informational, listed with the model in /v1/models
    slot_save_path: str | None = None  # --slot-save-path: where POST /slots/{id} saves slots
    sampling: SamplingParams = msgspec.field(default_factory=SamplingParams)  # request defaults
    # --reasoning-format: how a reasoning section is returned (auto/deepseek: apart, as
    # reasoning_content; none: left in the content); a request's reasoning_format overrides it
    reasoning_format: Literal["none", "auto", "deepseek", "deepseek-legacy"] = "auto"
    # --chat-template-kwargs: extra template variables (enable_thinking, ...), under a request's
    chat_template_kwargs: dict[str, Any] = {}
    # Several models: every one the server may load, the default (`engine`, `alias`, `sampling`
    # above) first; each loads on first use. None: the one model, loaded at start-up.
    models: list[ModelConfig] | None = None
    models_max: int = 4  # --models-max: most loaded at once (0: no limit), as llama-server's
    models_ttl: float = 0.0  # --models-ttl: idle seconds before a model unloads (<= 0: never)
    # Media (--mmproj): remote http(s) URLs are fetched only when allowed, private addresses
    # only when that is allowed too; every file is capped in bytes and (images) in pixels.
    allow_remote_media: bool = False
    allow_remote_media_private: bool = False
    media_max_bytes: int = 20 * 1024 * 1024
    media_max_pixels: int = 50_000_000
    remote_media_timeout: float = 10.0

    @property
    def model_name(self) -> str:
        if self.alias:
            return self.alias
        from pathlib import Path

        return Path(self.engine.model).stem
