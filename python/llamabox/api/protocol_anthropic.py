"""Wire types of Anthropic's Messages API (``POST /v1/messages``, ``/v1/messages/count_tokens``)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import Meta, Struct

from llamabox.api.protocol import TOOLS_MAX, SamplingFields, StopString, ToolName

# ---- request ----


class TextBlock(Struct, tag_field="type", tag="text", kw_only=True):
    text: str
    cache_control: Any = None
    citations: Any = None


class ImageBlock(Struct, tag_field="type", tag="image", kw_only=True):
    source: dict[str, Any]
    cache_control: Any = None


class ToolUseBlock(Struct, tag_field="type", tag="tool_use", kw_only=True):
    id: str
    name: ToolName
    input: dict[str, Any]
    cache_control: Any = None


class ToolResultBlock(Struct, tag_field="type", tag="tool_result", kw_only=True):
    tool_use_id: str
    content: str | list[TextBlock | ImageBlock] = ""
    is_error: bool = False
    cache_control: Any = None


class ThinkingBlock(Struct, tag_field="type", tag="thinking", kw_only=True):
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(Struct, tag_field="type", tag="redacted_thinking", kw_only=True):
    data: str


Block = (
    TextBlock | ImageBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | RedactedThinkingBlock
)


class InputMessage(Struct, kw_only=True):
    role: Literal["user", "assistant"]
    content: str | list[Block]


class AnthropicTool(Struct, kw_only=True):
    name: ToolName
    description: str | None = None
    input_schema: dict[str, Any] | None = None
    type: str | None = None  # "custom" or none; server tools (web_search_..., ...) are refused
    cache_control: Any = None


class ToolChoice(Struct, kw_only=True):
    type: Literal["auto", "any", "tool", "none"]
    name: ToolName | None = None
    disable_parallel_tool_use: bool | None = None


class ThinkingConfig(Struct, kw_only=True):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = None


class CountTokensRequest(Struct, kw_only=True):
    model: str | None = None
    messages: Annotated[list[InputMessage], Meta(min_length=1)]
    system: str | list[TextBlock] | None = None
    tools: Annotated[list[AnthropicTool], Meta(max_length=TOOLS_MAX)] | None = None
    tool_choice: ToolChoice | None = None
    thinking: ThinkingConfig | None = None


class MessagesRequest(SamplingFields, kw_only=True):
    """Anthropic's fields, and llama.cpp's sampling fields as on every endpoint."""

    model: str | None = None
    max_tokens: Annotated[int, Meta(ge=1, le=2**31 - 1)]
    messages: Annotated[list[InputMessage], Meta(min_length=1)]
    system: str | list[TextBlock] | None = None
    stop_sequences: Annotated[list[StopString], Meta(max_length=16)] | None = None
    stream: bool = False
    tools: Annotated[list[AnthropicTool], Meta(max_length=TOOLS_MAX)] | None = None
    tool_choice: ToolChoice | None = None
    thinking: ThinkingConfig | None = None
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None


# ---- response ----


class OutTextBlock(Struct, kw_only=True):
    text: str
    type: str = "text"


class OutThinkingBlock(Struct, kw_only=True):
    thinking: str
    type: str = "thinking"
    signature: str = ""


class OutToolUseBlock(Struct, kw_only=True):
    id: str
    name: str
    input: dict[str, Any]
    type: str = "tool_use"


OutBlock = OutTextBlock | OutThinkingBlock | OutToolUseBlock


class MessagesUsage(Struct, kw_only=True):
    input_tokens: int
    output_tokens: int
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0


class MessageObject(Struct, kw_only=True):
    id: str
    type: str = "message"
    role: str = "assistant"
    model: str
    content: list[OutBlock]
    stop_reason: str | None = None
    stop_sequence: str | None = None
    usage: MessagesUsage


class TokenCount(Struct):
    input_tokens: int
