"""LangChain messages to a :class:`~adapters.conversation.Conversation`: roles, text, images
(with where they came from), tool calls and tool results."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)

from adapters.conversation import (
    Conversation,
    UnsupportedContentError,
    decode_base64,
    image_from_url,
)
from adapters.remote_images import RemoteImageFetcher
from guardrail.trust import ImageSource

__all__ = ["Conversation", "UnsupportedContentError", "to_conversation"]


def _role(message: BaseMessage) -> str:
    if isinstance(message, SystemMessage):
        return "system"
    if isinstance(message, HumanMessage):
        return "user"
    if isinstance(message, AIMessage):
        return "assistant"
    if isinstance(message, ToolMessage):
        return "tool"
    if isinstance(message, ChatMessage):
        return message.role
    raise UnsupportedContentError(f"{type(message).__name__} is not supported")


def _tool_calls(message: AIMessage) -> list[dict[str, Any]]:
    """An AI message's tool calls in the chat-template form."""
    return [
        {
            "type": "function",
            "id": call.get("id"),
            "function": {"name": call["name"], "arguments": call["args"]},
        }
        for call in message.tool_calls
    ]


def to_conversation(messages: Sequence[BaseMessage], fetcher: RemoteImageFetcher) -> Conversation:
    """Convert LangChain messages (OpenAI ``image_url`` blocks, v1 image blocks, plain text,
    tool calls and tool results). An image in a tool result has the source ``tool``."""
    conversation = Conversation()
    for message in messages:
        role = _role(message)
        parts: list[dict[str, Any]] = []
        for typed_block in message.content_blocks:
            block: dict[str, Any] = dict(typed_block)
            kind = block.get("type")
            if kind == "text":
                parts.append({"type": "text", "text": block["text"]})
            elif kind == "image":
                source: ImageSource = "inline"
                if block.get("base64"):
                    data = decode_base64(block["base64"], fetcher.max_bytes)
                else:
                    data, source = image_from_url(block.get("url") or "", fetcher)
                parts.append(conversation.image_part(data, "tool" if role == "tool" else source))
            elif kind in ("reasoning", "tool_call", "tool_call_chunk", "invalid_tool_call"):
                continue  # history the model produced itself; no text to replay
            elif kind == "non_standard" and role == "assistant":
                continue  # a provider's own block (Anthropic tool_use...); calls are in tool_calls
            else:
                raise UnsupportedContentError(f"content block of type {kind!r} is not supported")
        extra: dict[str, Any] = {}
        if isinstance(message, AIMessage) and message.tool_calls:
            extra["tool_calls"] = _tool_calls(message)
        if isinstance(message, ToolMessage):
            extra["tool_call_id"] = message.tool_call_id
            if message.name:
                extra["name"] = message.name
        conversation.add(role, parts, **extra)
    return conversation
