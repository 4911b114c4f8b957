"""LangChain messages to a :class:`~adapters.conversation.Conversation` (roles, text, images
with where they came from, tool calls and tool results), and guarded outputs back to
LangChain messages."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.messages.ai import UsageMetadata
from langchain_core.messages.tool import invalid_tool_call, tool_call, tool_call_chunk

from adapters.conversation import (
    Conversation,
    UnsupportedContentError,
    decode_base64,
    image_from_url,
)
from adapters.remote_images import RemoteImageFetcher
from guardrail import GuardedOutput
from guardrail.trust import ImageSource

__all__ = ["Conversation", "UnsupportedContentError", "to_conversation", "to_message"]


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
    tool calls and tool results). An image in a message of any role but user and system (a
    tool result, say) has the source ``tool``."""
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
                parts.append(conversation.image_part(data, source, role))
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


def to_message(output: GuardedOutput, model_name: str, chunk: bool = False) -> Any:
    """A guarded output as an ``AIMessage`` (or, ``chunk``, a stream's last ``AIMessageChunk``:
    no text, each tool call as one whole chunk), the decision in ``response_metadata``."""
    usage = UsageMetadata(
        input_tokens=output.usage.prompt_tokens,
        output_tokens=output.usage.completion_tokens,
        total_tokens=output.usage.total_tokens,
    )
    invalid = output.invalid_tool_calls
    metadata = {
        "model_name": model_name,
        "model_provider": "cmrm-guardrail",
        "finish_reason": output.finish_reason,
        "safety": output.decision.model_dump(mode="json"),
    }
    if chunk:
        written: list[tuple[str | None, str, str]] = [
            (c.name, json.dumps(c.arguments), c.id) for c in output.tool_calls
        ]
        written += [(c.name, c.text, c.id) for c in invalid]
        chunks = [
            tool_call_chunk(name=name, args=args, id=id_, index=i)
            for i, (name, args, id_) in enumerate(written)
        ]
        return AIMessageChunk(
            content="", usage_metadata=usage, response_metadata=metadata, tool_call_chunks=chunks
        )
    return AIMessage(
        content=output.answer,
        usage_metadata=usage,
        response_metadata=metadata,
        tool_calls=[tool_call(name=c.name, args=c.arguments, id=c.id) for c in output.tool_calls],
        invalid_tool_calls=[
            invalid_tool_call(name=c.name, args=c.text, id=c.id, error=c.error) for c in invalid
        ],
    )
