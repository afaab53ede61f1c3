"""Wire types of OpenAI's Responses API (``POST /v1/responses``), stateless: what the request
carries is the whole conversation."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import Meta, Raw, Struct, field

from llamabox.api.protocol import (
    TOOLS_MAX,
    MaxTokens,
    ReasoningEffort,
    SamplingFields,
    ToolName,
)

# ---- request ----


class InputText(Struct, tag_field="type", tag="input_text"):
    text: str


class OutputText(Struct, tag_field="type", tag="output_text", kw_only=True):
    text: str
    annotations: list[Any] = []


class Refusal(Struct, tag_field="type", tag="refusal"):
    refusal: str


class InputImage(Struct, tag_field="type", tag="input_image", kw_only=True):
    image_url: str | None = None
    file_id: str | None = None
    detail: str | None = None


InputContent = InputText | OutputText | Refusal | InputImage


class MessageItem(Struct, tag_field="type", tag="message", kw_only=True):
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputContent]
    id: str | None = None
    status: str | None = None


class FunctionCallItem(Struct, tag_field="type", tag="function_call", kw_only=True):
    call_id: str
    name: ToolName
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(Struct, tag_field="type", tag="function_call_output", kw_only=True):
    call_id: str
    output: str | list[InputContent]
    id: str | None = None
    status: str | None = None


class ReasoningItem(Struct, tag_field="type", tag="reasoning", kw_only=True):
    id: str | None = None
    summary: list[Any] = []
    content: list[Any] | None = None
    encrypted_content: str | None = None


InputItem = MessageItem | FunctionCallItem | FunctionCallOutputItem | ReasoningItem


class FunctionTool(Struct, kw_only=True):
    type: str  # "function"; any other (web_search, ...) is refused
    name: ToolName | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunction(Struct, kw_only=True):
    type: Literal["function"]
    name: ToolName


class TextFormatSpec(Struct, kw_only=True):
    type: Literal["text", "json_schema", "json_object"] = "text"
    name: str | None = None
    schema: Raw = Raw()
    description: str | None = None
    strict: bool | None = None


class TextConfig(Struct, kw_only=True):
    format: TextFormatSpec | None = None
    verbosity: str | None = None


class ReasoningConfig(Struct, kw_only=True):
    effort: ReasoningEffort | None = None
    summary: str | None = None


class ResponsesRequest(SamplingFields, kw_only=True):
    """What the request takes; the sampling fields are llama.cpp's, as on every endpoint."""

    model: str | None = None
    # Items are checked one by one (a message item may leave out its "type").
    input: str | Annotated[list[dict[str, Any]], Meta(min_length=1)]
    instructions: str | None = None
    tools: Annotated[list[FunctionTool], Meta(max_length=TOOLS_MAX)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: MaxTokens | None = None
    stream: bool = False
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    previous_response_id: str | None = None  # stateless: refused
    store: bool | None = None  # accepted; nothing is stored
    metadata: dict[str, str] | None = None
    user: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None


# ---- response ----


class OutputTextPart(Struct, kw_only=True):
    text: str
    type: str = "output_text"
    annotations: list[Any] = []
    logprobs: list[Any] = []


class ReasoningTextPart(Struct, kw_only=True):
    text: str
    type: str = "reasoning_text"


class OutputMessage(Struct, kw_only=True):
    id: str
    content: list[OutputTextPart]
    type: str = "message"
    role: str = "assistant"
    status: str = "completed"


class OutputFunctionCall(Struct, kw_only=True):
    id: str
    call_id: str
    name: str
    arguments: str
    type: str = "function_call"
    status: str = "completed"


class OutputReasoning(Struct, kw_only=True):
    id: str
    content: list[ReasoningTextPart]
    type: str = "reasoning"
    summary: list[Any] = []
    status: str = "completed"


OutputItem = OutputMessage | OutputFunctionCall | OutputReasoning


class InputTokensDetails(Struct):
    cached_tokens: int


class OutputTokensDetails(Struct):
    reasoning_tokens: int


class ResponseUsage(Struct, kw_only=True):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class IncompleteDetails(Struct):
    reason: str


class ResponseObject(Struct, kw_only=True):
    id: str
    object: str = "response"
    created_at: int
    model: str
    status: str  # in_progress, completed, incomplete
    output: list[OutputItem]
    usage: ResponseUsage | None = None
    incomplete_details: IncompleteDetails | None = None
    error: None = None
    instructions: str | None = None
    tools: list[FunctionTool] = []
    tool_choice: Any = "auto"
    parallel_tool_calls: bool = True
    temperature: float | None = None
    top_p: float | None = None
    max_output_tokens: int | None = None
    metadata: dict[str, str] = {}
    text: dict[str, Any] = field(default_factory=lambda: {"format": {"type": "text"}})
    store: bool = False
