"""Wire types of Ollama's API (``/api/*``). Durations are in nanoseconds, as Ollama sends them."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import UNSET, Meta, Raw, Struct, UnsetType

from llamabox.api.protocol import (
    INT32_MAX,
    STOP_MAX,
    TOOLS_MAX,
    Float32,
    NativeTemperature,
    Probability,
    RepeatLastN,
    RepeatPenalty,
    Seed,
    StopString,
    Tool,
    ToolName,
    TopK,
    TypicalP,
)

# -1: no limit, -2: fill the context; 0 is refused (Ollama would answer nothing)
NumPredict = Annotated[int, Meta(ge=-2, le=INT32_MAX)]
# How long the model stays loaded after the request: a duration ("5m", "1h30m", "-1"), or
# seconds; 0: unload at once, negative: forever.
KeepAlive = Annotated[str, Meta(max_length=64)] | float


class OllamaOptions(Struct, kw_only=True):
    """The subset of Ollama's model options that maps onto our sampling; others are ignored."""

    num_predict: NumPredict | None = None
    temperature: NativeTemperature | None = None
    top_k: TopK | None = None
    top_p: Probability | None = None
    min_p: Probability | None = None
    typical_p: TypicalP | None = None
    repeat_penalty: RepeatPenalty | None = None
    repeat_last_n: RepeatLastN | None = None
    presence_penalty: Float32 | None = None
    frequency_penalty: Float32 | None = None
    seed: Seed | None = None
    stop: Annotated[list[StopString], Meta(max_length=STOP_MAX)] | None = None


class OllamaGenerateRequest(Struct, kw_only=True):
    model: str = ""
    prompt: str = ""
    suffix: str | None = None
    system: str | None = None
    raw: bool = False
    stream: bool = True
    format: Raw = Raw()  # "json" or a JSON schema object
    options: OllamaOptions | None = None
    images: list[str] | None = None
    keep_alive: KeepAlive | None = None


class OllamaFunctionCall(Struct, kw_only=True):
    name: ToolName
    arguments: dict[str, Any] = {}
    index: int | UnsetType = UNSET


class OllamaToolCall(Struct, kw_only=True):
    function: OllamaFunctionCall
    id: str | UnsetType = UNSET


class OllamaMessage(Struct, kw_only=True):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[str] | None = None
    tool_calls: list[OllamaToolCall] | None = None
    tool_name: str | None = None  # a tool message's function
    thinking: str | None = None


class OllamaChatRequest(Struct, kw_only=True):
    model: str = ""
    messages: list[OllamaMessage] = []
    stream: bool = True
    format: Raw = Raw()
    options: OllamaOptions | None = None
    tools: Annotated[list[Tool], Meta(max_length=TOOLS_MAX)] | None = None
    think: bool | Literal["low", "medium", "high"] | None = None
    keep_alive: KeepAlive | None = None


class OllamaEmbedRequest(Struct, kw_only=True):
    model: str = ""
    input: str | list[str]
    truncate: bool = True
    options: OllamaOptions | None = None
    keep_alive: KeepAlive | None = None


class OllamaShowRequest(Struct, kw_only=True):
    model: str = ""
    name: str = ""  # older clients send "name"


class OllamaDone(Struct, kw_only=True):
    """Fields common to generate and chat lines; the statistics only on the last one."""

    model: str
    created_at: str
    done: bool
    done_reason: str | UnsetType = UNSET
    total_duration: int | UnsetType = UNSET
    load_duration: int | UnsetType = UNSET
    prompt_eval_count: int | UnsetType = UNSET
    prompt_eval_duration: int | UnsetType = UNSET
    eval_count: int | UnsetType = UNSET
    eval_duration: int | UnsetType = UNSET


class OllamaGenerateResponse(OllamaDone, kw_only=True):
    response: str


class OllamaAssistantMessage(Struct):
    content: str
    role: str = "assistant"
    thinking: str | UnsetType = UNSET
    tool_calls: list[OllamaToolCall] | UnsetType = UNSET


class OllamaChatResponse(OllamaDone, kw_only=True):
    message: OllamaAssistantMessage


class OllamaEmbedResponse(Struct, kw_only=True):
    model: str
    embeddings: list[list[float]]
    total_duration: int
    load_duration: int
    prompt_eval_count: int


class OllamaModelDetails(Struct, kw_only=True):
    parent_model: str = ""
    format: str = "gguf"
    family: str
    families: list[str]
    parameter_size: str
    quantization_level: str


class OllamaModel(Struct, kw_only=True):
    name: str
    model: str
    modified_at: str
    size: int
    digest: str
    details: OllamaModelDetails


class OllamaTags(Struct):
    models: list[OllamaModel]


class OllamaRunningModel(OllamaModel, kw_only=True):
    expires_at: str  # when it unloads if it stays idle
    size_vram: int = 0


class OllamaRunning(Struct):
    """``GET /api/ps``: the loaded models."""

    models: list[OllamaRunningModel]


class OllamaShowResponse(Struct, kw_only=True):
    modelfile: str
    parameters: str
    template: str
    details: OllamaModelDetails
    model_info: dict[str, str | int]
    capabilities: list[str]


class OllamaVersion(Struct):
    version: str
