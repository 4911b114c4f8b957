"""LangChain messages to engine requests: roles, text, images (with where they came from),
tool calls and tool results."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)

from adapters.remote_images import RemoteImageFetcher
from guardrail.errors import InvalidImageError, InvalidInputError
from guardrail.trust import ImageSource


class UnsupportedContentError(InvalidInputError):
    """A content block the guard cannot handle (audio, files...): refused, never passed on."""


@dataclass
class Conversation:
    """Chat messages in the engine's format, the raw image bytes and each image's source."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    images: list[bytes] = field(default_factory=list)
    sources: list[ImageSource] = field(default_factory=list)


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


def _decode_base64(data: object, max_bytes: int) -> bytes:
    """Inline image bytes, under the same byte cap as a remote image."""
    if not isinstance(data, str):
        raise InvalidImageError(f"image data must be base64 text, not {type(data).__name__}")
    if len(data) // 4 * 3 > max_bytes:
        raise InvalidImageError(
            f"inline image of about {len(data) // 4 * 3} bytes exceeds {max_bytes}"
        )
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidImageError(f"image data is not valid base64: {e}") from e


def _image_bytes(block: dict[str, Any], fetcher: RemoteImageFetcher) -> tuple[bytes, ImageSource]:
    if block.get("base64"):
        return _decode_base64(block["base64"], fetcher.max_bytes), "inline"
    url = block.get("url") or ""
    if not isinstance(url, str):
        raise InvalidImageError(f"image URL must be text, not {type(url).__name__}")
    if url.startswith("data:"):
        header, _, data = url.partition(",")
        if ";base64" not in header:
            raise InvalidImageError("data URLs must be base64-encoded")
        return _decode_base64(data, fetcher.max_bytes), "inline"
    if url:
        return fetcher.fetch(url), "remote"
    raise InvalidImageError("image block has neither data nor URL")


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
                data, source = _image_bytes(block, fetcher)
                conversation.images.append(data)
                conversation.sources.append("tool" if role == "tool" else source)
                parts.append({"type": "image"})
            elif kind in ("reasoning", "tool_call", "tool_call_chunk", "invalid_tool_call"):
                continue  # history the model produced itself; no text to replay
            elif kind == "non_standard" and role == "assistant":
                continue  # a provider's own block (Anthropic tool_use...); calls are in tool_calls
            else:
                raise UnsupportedContentError(f"content block of type {kind!r} is not supported")
        has_image = any(p["type"] == "image" for p in parts)
        content: str | list[dict[str, Any]] = (
            parts if has_image else "".join(p["text"] for p in parts)
        )
        entry: dict[str, Any] = {"role": role, "content": content}
        if isinstance(message, AIMessage) and message.tool_calls:
            entry["tool_calls"] = _tool_calls(message)
        if isinstance(message, ToolMessage):
            entry["tool_call_id"] = message.tool_call_id
            if message.name:
                entry["name"] = message.name
        conversation.messages.append(entry)
    return conversation
