"""Types that cross the boundary between the serving layer and the engine.

Plain data only: the engine (``engine.py``) consumes ``GenerateRequest`` and yields
``GenerationOutput``; the HTTP layer (``api/``) maps wire types onto these.

Defaults have one home, the C++ structs the engine runs on (``csrc/request.h``,
``csrc/engine.h``): the defaults below are read from them, and the CLI, ``/props`` and the wire
types' "not given" all resolve to these.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from llamabox import _core

FinishReason = Literal["stop", "length", "cancelled", "error"]
PoolingType = Literal["model", "none", "mean", "cls", "last", "rank"]

_ENGINE = _core.EngineParams()
_SAMPLING = _core.SamplingParams()
_REQUEST = _core.Request()
_SPEC = _ENGINE.speculative


def _f32(value: float) -> float:
    """A C++ float as the decimal it was written as (0.8, not 0.800000011920929)."""
    return float(f"{value:.7g}")


class NgramMapConfig(msgspec.Struct, kw_only=True):
    """One n-gram map type's sizes (ngram-simple, ngram-map-k, ngram-map-k4v)."""

    size_n: int = _SPEC.ngram_simple.size_n  # n-gram looked up
    size_m: int = _SPEC.ngram_simple.size_m  # m-gram drafted after it
    min_hits: int = _SPEC.ngram_simple.min_hits  # times the n-gram must have been seen


class SpeculativeConfig(msgspec.Struct, kw_only=True):
    """Speculative decoding: drafted tokens verified in the same step as everything else.

    Off unless ``types`` names a drafting type or ``draft_model`` is given. Types are
    llama.cpp's names: draft-simple (a draft model), ngram-simple, ngram-map-k, ngram-map-k4v,
    ngram-mod and ngram-cache.
    """

    types: list[str] = []
    n_max: int = _SPEC.n_max  # longest draft per step
    n_min: int = _SPEC.n_min  # shorter drafts are not verified
    p_min: float = _f32(_SPEC.p_min)  # draft model: stop below this top-token probability
    adaptive: bool = _SPEC.adaptive  # verify only the draft tokens that pay for themselves
    draft_model: str | None = None
    draft_n_gpu_layers: int = _SPEC.draft_n_gpu_layers
    draft_n_ctx: int = _SPEC.draft_n_ctx  # 0 = the target's
    draft_n_threads: int = _SPEC.draft_n_threads  # 0 = the target's
    draft_n_threads_batch: int = _SPEC.draft_n_threads_batch
    draft_cache_type_k: str = _SPEC.draft_cache_type_k
    draft_cache_type_v: str = _SPEC.draft_cache_type_v
    draft_devices: list[str] = []
    ngram_simple: NgramMapConfig = msgspec.field(default_factory=NgramMapConfig)
    ngram_map_k: NgramMapConfig = msgspec.field(default_factory=NgramMapConfig)
    ngram_map_k4v: NgramMapConfig = msgspec.field(default_factory=NgramMapConfig)
    ngram_mod_n_match: int = _SPEC.ngram_mod_n_match
    ngram_mod_n_min: int = _SPEC.ngram_mod_n_min
    ngram_mod_n_max: int = _SPEC.ngram_mod_n_max
    lookup_cache_static: str | None = None
    lookup_cache_dynamic: str | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.draft_model) or any(t != "none" for t in self.types)


class SpeculativeOverride(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A request's own speculative settings; None: the server's."""

    n_max: int | None = None  # 0 = no speculation for this request; capped at the server's
    n_min: int | None = None
    p_min: float | None = None
    type: str | None = None  # one type the server has, or "none"


class EngineConfig(msgspec.Struct, kw_only=True):
    """How the engine loads the model and sizes its context. Field names follow llama.cpp."""

    model: str
    n_ctx: int = _ENGINE.n_ctx  # total context, split over the slots; 0 = training context
    n_parallel: int = _ENGINE.n_parallel  # slots decoding at once
    n_batch: int = _ENGINE.n_batch  # logical batch: tokens per engine step
    n_ubatch: int = _ENGINE.n_ubatch  # physical batch (and the longest embedding input)
    n_threads: int = _ENGINE.n_threads  # 0 = number of physical cores
    n_threads_batch: int = _ENGINE.n_threads_batch  # 0 = same as n_threads
    n_gpu_layers: int = _ENGINE.n_gpu_layers  # -1 = all that fit on the GPU backend
    flash_attn: Literal["auto", "on", "off"] = "auto"
    cache_type_k: str = _ENGINE.cache_type_k
    cache_type_v: str = _ENGINE.cache_type_v
    use_mmap: bool = _ENGINE.use_mmap
    use_mlock: bool = _ENGINE.use_mlock
    repack: bool = _ENGINE.repack  # repack weights into the CPU backend's faster layouts
    seed: int = _ENGINE.seed  # default seed for requests that give none; -1 = random
    kv_unified: bool = _ENGINE.kv_unified
    swa_full: bool = _ENGINE.swa_full  # full-size SWA cache: prefix reuse on SWA models
    n_queue_max: int = _ENGINE.n_queue_max  # requests waiting for a slot before submit fails
    embeddings: bool = _ENGINE.embeddings  # enable embed(), in a context of its own
    pooling: PoolingType = "model"
    # --rerank: the embedding context pools with the model's rank head (implies embeddings)
    rerank: bool = False
    # LoRA adapters: --lora files at scale 1, then --lora-scaled (file, scale) pairs; ids in
    # that order. With lora_init_without_apply they load at scale 0 (POST /lora-adapters).
    lora: list[str] = msgspec.field(default_factory=list)
    lora_scaled: list[tuple[str, float]] = msgspec.field(default_factory=list)
    lora_init_without_apply: bool = False
    # --mmproj: the multimodal projector (images, audio) for the model; None: text only
    mmproj: str | None = None
    mmproj_offload: bool = True  # --no-mmproj-offload: the projector stays on the CPU
    image_min_tokens: int = -1  # dynamic-resolution projectors: bounds per image (-1: the file's)
    image_max_tokens: int = -1
    visual_max_image_size: int = 0  # images with a longer side are scaled down first (0: never)
    max_projected_cache: int = 16  # distinct media inputs whose embeddings are kept
    chat_template: str | None = None  # built-in name (chatml, llama3, ...) or Jinja source
    n_predict: int = _REQUEST.n_predict  # max tokens of requests without one; -1 = context full
    speculative: SpeculativeConfig = msgspec.field(default_factory=SpeculativeConfig)
    # ggml RPC servers (host:port) whose devices take layers like GPUs (n_gpu_layers)
    rpc_servers: list[str] = msgspec.field(default_factory=list)
    verbose: bool = _ENGINE.verbose  # llama.cpp's own logs


class ToolGrammar(msgspec.Struct, kw_only=True):
    """A chat template's tool-call grammar (``Engine.apply_chat``), in place of ``grammar``:
    applied from the start, or, when lazy, from the first trigger on."""

    grammar: str
    lazy: bool = False
    triggers: list[tuple[int, str]] = []  # (llama.cpp's common_grammar_trigger_type, value)
    preserved_tokens: list[str] = []  # special tokens of the call format, shown in the text
    generation_prompt: str = ""  # what the template put after the last message


class SamplingParams(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Per-request sampling. temperature 0 is greedy."""

    temperature: float = _f32(_SAMPLING.temperature)
    top_k: int = _SAMPLING.top_k
    top_p: float = _f32(_SAMPLING.top_p)
    min_p: float = _f32(_SAMPLING.min_p)
    typical_p: float = _f32(_SAMPLING.typical_p)
    repeat_penalty: float = _f32(_SAMPLING.repeat_penalty)
    repeat_last_n: int = _SAMPLING.repeat_last_n  # -1 = whole context
    presence_penalty: float = _f32(_SAMPLING.presence_penalty)
    frequency_penalty: float = _f32(_SAMPLING.frequency_penalty)
    seed: int | None = None  # None: the engine's default seed
    logit_bias: dict[int, float] = {}  # token id -> bias; -inf bans the token
    grammar: str | None = None  # GBNF
    json_schema: str | None = None  # JSON schema (as JSON text), converted to a grammar
    tool_grammar: ToolGrammar | None = None  # a chat template's, instead of the two above
    ignore_eos: bool = _SAMPLING.ignore_eos
    n_probs: int = _SAMPLING.n_probs  # top-n alternatives reported per token (needs logprobs)
    logprobs: bool = _SAMPLING.logprobs  # report the log-probability of each sampled token


class MediaInput(msgspec.Struct, kw_only=True):
    """An image or audio file for one media marker of a text prompt (Engine.media_marker)."""

    data: bytes
    param: str = "media"  # where it came from on the wire (messages[0].content[1]), for errors


class GenerateRequest(msgspec.Struct, kw_only=True):
    prompt: str | list[int]
    media: list[MediaInput] = []  # for the markers in a text prompt, in order
    max_tokens: int | None = None  # None: config.n_predict, else until the slot context is full
    stop: list[str] = []
    sampling: SamplingParams = msgspec.field(default_factory=SamplingParams)
    add_special: bool = _REQUEST.add_special  # BOS etc. when tokenizing a text prompt
    parse_special: bool = _REQUEST.parse_special  # special tokens written in the text count
    cache_prompt: bool = _REQUEST.cache_prompt  # reuse a slot's cached prefix
    speculative: SpeculativeOverride | None = None  # None: the server's settings
    # LoRA (adapter id, scale) pairs, the adapters not named off; None: the server's scales
    lora: list[tuple[int, float]] | None = None
    request_id: str | None = None  # for logs


class TopLogprob(msgspec.Struct, array_like=True):
    token: int
    text: bytes
    logprob: float


class TokenLogprob(msgspec.Struct):
    token: int
    text: bytes
    logprob: float
    top: list[TopLogprob] = []


class Usage(msgspec.Struct, kw_only=True):
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens reused from a slot's cache
    completion_tokens: int = 0
    prompt_ms: float = 0.0
    generation_ms: float = 0.0
    drafted_tokens: int = 0
    accepted_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class GenerationOutput(msgspec.Struct, kw_only=True):
    """One step's worth of one request's output. The last one has finish_reason and usage."""

    text: str = ""  # new text (UTF-8 complete; stop strings never included)
    token_ids: list[int] = []
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None
    stop_word: str | None = None  # which stop string ended generation
    usage: Usage | None = None


class EmbeddingResult(msgspec.Struct):
    embedding: list[float] | list[list[float]]  # L2-normalized; one per token when pooling "none"
    prompt_tokens: int


class RerankResult(msgspec.Struct):
    score: float  # the rank head's (first) output: a relevance logit, higher is more relevant
    prompt_tokens: int


class LoraAdapter(msgspec.Struct):
    id: int
    path: str
    scale: float


class ModelInfo(msgspec.Struct, kw_only=True):
    path: str
    description: str
    architecture: str
    n_params: int
    size_bytes: int
    n_vocab: int
    n_ctx_train: int
    n_embd: int
    n_ctx: int  # the engine's whole context
    n_ctx_slot: int  # context per slot
    chat_template: str  # in use: a built-in name, or Jinja source (model's, user's, fallback)
    # supports_tools, supports_tool_calls, supports_parallel_tool_calls, supports_thinking, ...
    # (llama.cpp's names); empty for a built-in template name
    chat_template_caps: dict[str, bool] = {}
    has_fim: bool  # the vocabulary has fill-in-the-middle tokens
    bos_token: str
    eos_token: str
    embeddings: bool = False  # embed() is served
    n_embd_tokens_max: int = 0  # longest embedding input
    vision: bool = False  # a projector (--mmproj) takes images
    audio: bool = False  # ... audio


class SlotInfo(msgspec.Struct, kw_only=True):
    id: int
    state: int  # 0 idle, 1 processing
    n_ctx: int
    n_cached: int  # tokens in this slot's KV cache
    n_prompt: int
    n_decoded: int
    n_drafted: int = 0  # draft tokens verified for the current request
    n_accepted: int = 0  # of which accepted
    draft_acceptance: float = 0.0  # the scheduler's per-token acceptance estimate
    request_id: str | None


class EngineStats(msgspec.Struct, kw_only=True):
    n_slots: int
    n_busy: int  # requests_processing
    n_queued: int  # requests_deferred
    kv_cells_used: int
    kv_cells_total: int
    n_prompt_tokens_total: int
    t_prompt_ms_total: float
    n_tokens_predicted_total: int
    t_predicted_ms_total: float
    n_tokens_drafted_total: int
    n_tokens_drafted_accepted_total: int
    n_decode_total: int  # llama_decode calls
    n_decode_failed_total: int  # of which failed (a prefill shed and retried, or requests failed)
    n_requests_total: int
    # --mmproj: media inputs prepared, of which the projected cache had, of which were encoded
    n_media_inputs_total: int = 0
    n_media_cache_hits_total: int = 0
    n_media_encoded_total: int = 0
    t_media_encode_ms_total: float = 0.0
    n_media_cache_entries: int = 0
    n_media_decodes_total: int = 0
    slots: list[SlotInfo]


class LlamaboxError(Exception):
    """Base of the engine's errors."""


class ModelLoadError(LlamaboxError):
    """The model file is missing, not GGUF, or of an architecture llama.cpp cannot load."""


class InvalidRequestError(LlamaboxError):
    """The request cannot be served as given (HTTP 400). ``param`` names the field at fault."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ContextLengthError(InvalidRequestError):
    def __init__(self, n_prompt: int, n_ctx_slot: int) -> None:
        super().__init__(
            f"prompt has {n_prompt} tokens, context per slot is {n_ctx_slot}", param="prompt"
        )
        self.n_prompt = n_prompt
        self.n_ctx_slot = n_ctx_slot


class QueueFullError(LlamaboxError):
    """Every slot is busy and the wait queue is full (HTTP 503 with Retry-After)."""


class EngineStoppedError(LlamaboxError):
    """The engine is not running."""


class GenerationError(LlamaboxError):
    """The engine failed this request mid-way (a failed decode, say); others are unaffected."""
