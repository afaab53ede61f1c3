"""Wire types of the OpenAI and llama.cpp / LLaMA Box endpoints (Ollama's: ``protocol_ollama``).

Plain data: constraints live in the types, behaviour in the route modules. Request fields left
out (``None``) fall back to the server's defaults. Response fields typed ``... | UnsetType`` are
left out of the JSON unless set; ``None`` fields are sent as ``null`` as OpenAI sends them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import UNSET, Meta, Raw, Struct, UnsetType

# The ranges every request is checked against at the edge. They also keep each value within
# the native type it becomes (int32, int64, float32), so nothing overflows on its way to C++;
# what only the engine knows (the vocabulary, the context) the engine checks.
INT32_MAX = 2**31 - 1
FLOAT32_MAX = 3.4028234663852886e38
Float32 = Annotated[float, Meta(ge=-FLOAT32_MAX, le=FLOAT32_MAX)]
Temperature = Annotated[float, Meta(ge=0, le=2)]  # OpenAI's range
NativeTemperature = Annotated[float, Meta(le=FLOAT32_MAX)]  # llama.cpp: <= 0 is greedy
Probability = Annotated[float, Meta(ge=0, le=1)]
TypicalP = Annotated[float, Meta(gt=0, le=1)]
Penalty = Annotated[float, Meta(ge=-2, le=2)]
RepeatPenalty = Annotated[float, Meta(gt=0, le=FLOAT32_MAX)]
RepeatLastN = Annotated[int, Meta(ge=-1, le=INT32_MAX)]  # -1: the whole context
TopK = Annotated[int, Meta(ge=-INT32_MAX, le=INT32_MAX)]  # <= 0: off
Seed = Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)]  # < 0: random
MaxTokens = Annotated[int, Meta(ge=-1, le=INT32_MAX)]  # -1: until the context is full
TopLogprobs = Annotated[int, Meta(ge=0, le=20)]
NProbs = Annotated[int, Meta(ge=0, le=100)]
STOP_MAX = 16  # stop strings per request
StopString = Annotated[str, Meta(max_length=1024)]
Stop = StopString | Annotated[list[StopString], Meta(max_length=STOP_MAX)]
# OpenAI: {"token id": bias}; llama.cpp also [[token id or text, bias]]; false bans the token.
Bias = Float32 | bool
LogitBias = dict[str, Bias] | list[tuple[int | str, Bias]]
# A prompt or embedding input: text, texts, tokens, or token lists.
PromptInput = str | list[str | int | list[int]]
Role = Literal["system", "developer", "user", "assistant", "tool", "function"]


class TextPart(Struct, tag_field="type", tag="text"):
    text: str


class ImageURL(Struct):
    url: str
    detail: str | None = None


class ImagePart(Struct, tag_field="type", tag="image_url"):
    image_url: ImageURL | str  # OpenAI's object; the bare URL as some clients send it

    @property
    def url(self) -> str:
        return self.image_url if isinstance(self.image_url, str) else self.image_url.url


class SourcedImagePart(ImagePart, kw_only=True):
    """An image part made from another API's image (Responses' ``input_image``, an Anthropic
    image block), with its place on that API's wire, for errors. Never decoded."""

    wire_param: str


def part_param(part: object, default: str) -> str:
    """Where a content part is on the wire: ``default``, unless it came from another API."""
    return part.wire_param if isinstance(part, SourcedImagePart) else default


class InputAudio(Struct):
    data: str  # base64
    format: str = "wav"  # wav, mp3 (OpenAI); flac too (libmtmd)


class AudioPart(Struct, tag_field="type", tag="input_audio"):
    input_audio: InputAudio


ContentPart = TextPart | ImagePart | AudioPart


class MultimodalPrompt(Struct, kw_only=True, forbid_unknown_fields=True):
    """llama.cpp's multimodal prompt: text with one ``<__media__>`` marker per file of
    ``multimodal_data`` (base64), in order."""

    prompt_string: str
    multimodal_data: list[str] = []


class InputFunctionCall(Struct, kw_only=True):
    name: Annotated[str, Meta(min_length=1, max_length=256)]
    arguments: str | dict[str, Any] = "{}"  # JSON text (OpenAI), or the object itself


class InputToolCall(Struct, kw_only=True):
    id: str | None = None
    type: Literal["function"] = "function"
    function: InputFunctionCall


class ChatMessage(Struct, kw_only=True):
    role: Role
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[InputToolCall] | None = None
    function_call: InputFunctionCall | None = None  # legacy
    reasoning_content: str | None = None  # an earlier answer's, for templates that show it


ToolName = Annotated[str, Meta(min_length=1, max_length=256)]


class FunctionDef(Struct, kw_only=True):
    name: ToolName
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; none: no arguments
    strict: bool | None = None


class Tool(Struct, kw_only=True):
    type: Literal["function"] = "function"
    function: FunctionDef


class FunctionName(Struct):
    name: ToolName


class NamedToolChoice(Struct, kw_only=True):
    type: Literal["function"] = "function"
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice
FunctionCallChoice = Literal["none", "auto"] | FunctionName  # the legacy ``function_call``
ReasoningFormat = Literal["none", "auto", "deepseek", "deepseek-legacy"]
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high"]
TOOLS_MAX = 128


class StreamOptions(Struct, kw_only=True):
    include_usage: bool = False


class JSONSchemaSpec(Struct, kw_only=True):
    name: str = "response"
    schema: Raw = Raw()
    description: str | None = None
    strict: bool | None = None


class TextFormat(Struct, tag_field="type", tag="text"):
    pass


class JSONObjectFormat(Struct, tag_field="type", tag="json_object"):
    schema: Raw = Raw()  # llama.cpp's extension: constrain the object further


class JSONSchemaFormat(Struct, tag_field="type", tag="json_schema"):
    json_schema: JSONSchemaSpec


ResponseFormat = TextFormat | JSONObjectFormat | JSONSchemaFormat


DraftTokens = Annotated[int, Meta(ge=0, le=1024)]
SpeculativeType = Literal[
    "none",
    "draft",
    "draft-simple",
    "ngram-simple",
    "ngram-map-k",
    "ngram-map-k4v",
    "ngram-mod",
    "ngram-cache",
]


class SpeculativeFields(Struct, kw_only=True, forbid_unknown_fields=True):
    """A request's own speculative decoding (llama.cpp's ``speculative`` object)."""

    n_max: DraftTokens | None = None  # 0: none for this request; capped at the server's --draft
    n_min: DraftTokens | None = None
    p_min: Probability | None = None
    type: SpeculativeType | None = None


class LoraScale(Struct, kw_only=True, forbid_unknown_fields=True):
    """One LoRA adapter's scale (``GET /lora-adapters`` lists the ids)."""

    id: Annotated[int, Meta(ge=0, le=1_000_000)]
    scale: Annotated[float, Meta(ge=-1e6, le=1e6)]


LoraScales = Annotated[list[LoraScale], Meta(max_length=1024)]


class SamplingFields(Struct, kw_only=True):
    """Sampling and stopping fields every generation endpoint takes (llama.cpp's names)."""

    temperature: Temperature | None = None
    top_p: Probability | None = None
    top_k: TopK | None = None
    min_p: Probability | None = None
    typical_p: TypicalP | None = None
    repeat_penalty: RepeatPenalty | None = None
    repeat_last_n: RepeatLastN | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    seed: Seed | None = None
    logit_bias: LogitBias | None = None
    grammar: str | None = None
    json_schema: Raw = Raw()  # a schema object, or its JSON text as a string
    response_format: ResponseFormat | None = None
    ignore_eos: bool | None = None
    n_probs: NProbs | None = None
    cache_prompt: bool | None = None
    stop: Stop | None = None
    speculative: SpeculativeFields | None = None
    # llama.cpp's flat spellings of the same
    speculative_n_max: DraftTokens | None = None
    speculative_n_min: DraftTokens | None = None
    speculative_p_min: Probability | None = None
    # LoRA adapters for this request, the others off (llama.cpp's `lora`); absent: the server's
    lora: LoraScales | None = None


class OpenAIGenerationFields(SamplingFields, kw_only=True):
    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: MaxTokens | None = None
    n: Annotated[int, Meta(ge=1)] = 1
    user: str | None = None


class ChatFields(OpenAIGenerationFields, kw_only=True):
    """Tools and reasoning: what the chat template renders besides the messages."""

    tools: Annotated[list[Tool], Meta(max_length=TOOLS_MAX)] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: Annotated[list[FunctionDef], Meta(max_length=TOOLS_MAX)] | None = None  # legacy
    function_call: FunctionCallChoice | None = None  # legacy
    reasoning_effort: ReasoningEffort | None = None
    reasoning_format: ReasoningFormat | None = None  # llama.cpp's; the server's --reasoning-format
    chat_template_kwargs: dict[str, Any] | None = None


class ChatCompletionRequest(ChatFields, kw_only=True):
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool = False
    top_logprobs: TopLogprobs | None = None


class CompletionRequest(OpenAIGenerationFields, kw_only=True):
    prompt: PromptInput | MultimodalPrompt
    multimodal_data: list[str] | None = None  # llama.cpp's: files for a text prompt's markers
    suffix: str | None = None
    echo: bool = False
    logprobs: TopLogprobs | None = None
    best_of: int | None = None  # accepted, ignored


class EmbeddingRequest(Struct, kw_only=True):
    input: PromptInput
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None  # accepted, ignored
    user: str | None = None


class NativeCompletionRequest(SamplingFields, kw_only=True):
    """llama.cpp's ``POST /completion``: prompt as text, or tokens mixed with text pieces, or a
    multimodal prompt (also as a text prompt beside ``multimodal_data``)."""

    prompt: str | list[str | int] | MultimodalPrompt = ""
    multimodal_data: list[str] | None = None
    model: str | None = None  # several models: which one
    temperature: NativeTemperature | None = None
    n_predict: MaxTokens | None = None
    max_tokens: MaxTokens | None = None  # alias of n_predict
    stream: bool = False
    return_tokens: bool = False


class InfillExtra(Struct, kw_only=True):
    filename: str = ""
    text: str = ""


class InfillRequest(NativeCompletionRequest, kw_only=True):
    input_prefix: str = ""
    input_suffix: str = ""
    input_extra: list[InfillExtra] = []


class TokenizeRequest(Struct, kw_only=True):
    content: str
    model: str | None = None
    add_special: bool = False
    parse_special: bool = True
    with_pieces: bool = False


class DetokenizeRequest(Struct, kw_only=True):
    tokens: list[int]
    model: str | None = None


class ApplyTemplateRequest(Struct, kw_only=True):
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    model: str | None = None


class PromptTokensDetails(Struct):
    cached_tokens: int


class UsageInfo(Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class Timings(Struct, kw_only=True):
    """llama.cpp's per-request timings; ``prompt_n`` counts evaluated (not cached) tokens."""

    cache_n: int
    prompt_n: int
    prompt_ms: float
    prompt_per_token_ms: float
    prompt_per_second: float
    predicted_n: int
    predicted_ms: float
    predicted_per_token_ms: float
    predicted_per_second: float
    draft_n: int | UnsetType = UNSET
    draft_n_accepted: int | UnsetType = UNSET


class ChatTopLogprob(Struct):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(Struct):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[ChatTopLogprob]


class ChatLogprobs(Struct):
    content: list[ChatTokenLogprob]
    refusal: None = None


class FunctionCall(Struct):
    name: str
    arguments: str  # JSON text


class ToolCall(Struct, kw_only=True):
    id: str
    type: str = "function"
    function: FunctionCall


class AssistantMessage(Struct, kw_only=True):
    content: str | None
    role: str = "assistant"
    reasoning_content: str | UnsetType = UNSET
    tool_calls: list[ToolCall] | UnsetType = UNSET
    function_call: FunctionCall | UnsetType = UNSET  # the answer to legacy ``functions``


class ChatChoice(Struct):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: str


class ChatCompletion(Struct, kw_only=True):
    id: str
    object: str = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: UsageInfo
    timings: Timings | UnsetType = UNSET


class FunctionCallDelta(Struct, kw_only=True):
    name: str | UnsetType = UNSET
    arguments: str = ""


class ToolCallDelta(Struct, kw_only=True):
    index: int
    id: str | UnsetType = UNSET
    type: str | UnsetType = UNSET
    function: FunctionCallDelta


class Delta(Struct, kw_only=True):
    role: str | UnsetType = UNSET
    content: str | None | UnsetType = UNSET
    reasoning_content: str | UnsetType = UNSET
    tool_calls: list[ToolCallDelta] | UnsetType = UNSET
    function_call: FunctionCallDelta | UnsetType = UNSET


class ChatChunkChoice(Struct, kw_only=True):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(Struct, kw_only=True):
    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | UnsetType = UNSET
    timings: Timings | UnsetType = UNSET


class CompletionLogprobs(Struct, kw_only=True):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(Struct, kw_only=True):
    text: str
    index: int
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class Completion(Struct, kw_only=True):
    """A ``text_completion``: the whole answer, or one streamed chunk of it."""

    id: str
    object: str = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: UsageInfo | UnsetType = UNSET
    timings: Timings | UnsetType = UNSET


class Embedding(Struct, kw_only=True):
    object: str = "embedding"
    index: int
    embedding: list[float] | str  # str: base64 of little-endian float32


class EmbeddingUsage(Struct):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(Struct, kw_only=True):
    object: str = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class ModelMeta(Struct, kw_only=True):
    n_vocab: int
    n_ctx_train: int
    n_embd: int
    n_params: int
    size: int


class ModelStatus(Struct, kw_only=True, omit_defaults=True):
    """A model's state, as llama-server's router reports it (a failed load: unloaded, failed)."""

    value: Literal["loaded", "loading", "unloaded"]
    failed: bool = False  # the last load failed (the next request tries again)
    error: str | None = None  # why
    load_seconds: float | None = None  # how long the last load took
    progress: float | None = None  # while loading: the share of the weights read, 0..1


class ModelCard(Struct, kw_only=True):
    id: str
    object: str = "model"
    created: int
    owned_by: str = "llamabox"
    tags: list[str] | UnsetType = UNSET  # --tags (llama-server's informational model tags)
    meta: ModelMeta | UnsetType = UNSET
    aliases: list[str] | UnsetType = UNSET  # other names that pick it (several models)
    status: ModelStatus | UnsetType = UNSET
    # What it takes and does: "completion", "embedding", "vision", "audio" (when known: a
    # model not loaded yet has "vision" from --mmproj; "audio" is known once loaded).
    capabilities: list[str] | UnsetType = UNSET


class ModelActionRequest(Struct, kw_only=True):
    """``POST /models/load`` and ``/models/unload`` (llama-server's router)."""

    model: Annotated[str, Meta(min_length=1)]


class ModelActionResult(Struct):
    success: bool = True


class ModelList(Struct, kw_only=True):
    object: str = "list"
    data: list[ModelCard]


class NativeTopProb(Struct, kw_only=True):
    id: int
    token: str
    bytes: list[int]
    logprob: float


class NativeTokenProb(Struct, kw_only=True):
    id: int
    token: str
    bytes: list[int]
    logprob: float
    top_logprobs: list[NativeTopProb]


class NativeCompletion(Struct, kw_only=True):
    """llama.cpp's ``/completion`` answer, and each event of its stream (``stop`` on the last)."""

    content: str
    index: int = 0
    id_slot: int = -1
    stop: bool
    model: str | UnsetType = UNSET
    tokens: list[int] | UnsetType = UNSET
    completion_probabilities: list[NativeTokenProb] | UnsetType = UNSET
    tokens_predicted: int | UnsetType = UNSET
    tokens_evaluated: int | UnsetType = UNSET
    tokens_cached: int | UnsetType = UNSET
    stop_type: str | UnsetType = UNSET  # "eos", "word", "limit"
    stopping_word: str | UnsetType = UNSET
    truncated: bool | UnsetType = UNSET
    has_new_line: bool | UnsetType = UNSET
    timings: Timings | UnsetType = UNSET


class TokenPiece(Struct):
    id: int
    piece: str | list[int]  # the bytes as a list where they are not valid UTF-8


class TokenizeResponse(Struct):
    tokens: list[int] | list[TokenPiece]


class DetokenizeResponse(Struct):
    content: str


class ApplyTemplateResponse(Struct):
    prompt: str


class Props(Struct, kw_only=True):
    default_generation_settings: dict[str, Any]
    total_slots: int
    model_path: str
    model_alias: str
    chat_template: str
    chat_template_caps: dict[str, bool]  # as llama-server: what the template can do
    bos_token: str
    eos_token: str
    build_info: str
    system_info: dict[str, Any]  # backend, ggml backends, devices, llama.cpp build, CPU features
    modalities: dict[str, bool]
    # What marks a file's place in a /completion multimodal prompt (as llama-server's /props
    # says; "<__media__>" works too); absent without a projector.
    media_marker: str | UnsetType = UNSET
    embeddings: bool
    infill: bool


class SlotView(Struct, kw_only=True):
    id: int
    id_task: str | None
    speculative: bool = False
    n_draft_total: int = 0  # draft tokens verified for the current request
    n_draft_accepted: int = 0
    draft_acceptance: float = 0.0  # the scheduler's estimate; it sizes the drafts
    n_ctx: int
    state: int  # 0 idle, 1 processing
    is_processing: bool
    n_cached: int
    n_prompt_tokens: int
    n_decoded: int
