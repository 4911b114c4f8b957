"""The OpenAI chat completions wire format, as far as the server speaks it."""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, convert_to_messages
from pydantic import BaseModel, ConfigDict, Field, field_validator

from guardrail.errors import InvalidInputError


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions``. Fields the server cannot honour are refused (400)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    n: Literal[1] | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > 4:
            raise ValueError("at most 4 stop sequences")
        return stop

    def langchain_messages(self) -> list[BaseMessage]:
        try:
            return convert_to_messages(self.messages)
        except (ValueError, TypeError, KeyError, NotImplementedError) as e:
            raise InvalidInputError(f"messages: {e}") from e

    def call_arguments(self, max_tokens: int, max_time: float) -> dict[str, Any]:
        """Keyword arguments for the chat model's call (``max_tokens`` already checked;
        generation stops after ``max_time`` seconds)."""
        arguments: dict[str, Any] = {"max_tokens": max_tokens, "max_time": max_time}
        for name in ("temperature", "top_p", "seed", "tools", "tool_choice", "response_format"):
            value = getattr(self, name)
            if value is not None:
                arguments[name] = value
        if self.tool_choice is not None and not self.tools:
            raise InvalidInputError("tool_choice needs tools")
        return arguments

    @property
    def stops(self) -> list[str] | None:
        return [self.stop] if isinstance(self.stop, str) else self.stop

    @property
    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def _tool_calls(message: AIMessage) -> list[dict[str, Any]]:
    return [
        {
            "id": call["id"],
            "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(call["args"])},
        }
        for call in message.tool_calls
    ]


def completion(message: AIMessage, model: str) -> dict[str, Any]:
    """A ``chat.completion`` object, with the decision record as the extra field ``safety``."""
    safety = message.response_metadata["safety"]
    body: dict[str, Any] = {"role": "assistant", "content": message.content or None}
    if message.tool_calls:
        body["tool_calls"] = _tool_calls(message)
    usage = message.usage_metadata or {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}
    return {
        "id": f"chatcmpl-{safety['call_id']}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": body,
                "finish_reason": message.response_metadata.get("finish_reason", "stop"),
            }
        ],
        "usage": {
            "prompt_tokens": usage["input_tokens"],
            "completion_tokens": usage["output_tokens"],
            "total_tokens": usage["total_tokens"],
        },
        "safety": safety,
    }


def chunk(
    stream_id: str,
    model: str,
    delta: dict[str, Any],
    finish_reason: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One ``chat.completion.chunk``."""
    choices = (
        [{"index": 0, "delta": delta, "finish_reason": finish_reason}]
        if delta or finish_reason
        else []
    )
    return {
        "id": stream_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        **extra,
    }


def chunk_delta(piece: AIMessageChunk) -> dict[str, Any]:
    """The delta of one streamed piece: its text and any tool call chunks."""
    delta: dict[str, Any] = {}
    if piece.content:
        delta["content"] = piece.content
    if piece.tool_call_chunks:
        delta["tool_calls"] = [
            {
                "index": c["index"],
                "id": c["id"],
                "type": "function",
                "function": {"name": c["name"], "arguments": c["args"]},
            }
            for c in piece.tool_call_chunks
        ]
    return delta


def error_body(message: str, kind: str, code: str | None = None, **extra: Any) -> dict[str, Any]:
    """An OpenAI-style error object."""
    return {"error": {"message": message, "type": kind, "code": code}, **extra}
