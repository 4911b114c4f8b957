"""The OpenAI chat completions wire format, as far as the server speaks it."""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from adapters.conversation import (
    Conversation,
    UnsupportedContentError,
    answer_constraint,
    image_from_url,
    tool_choice_value,
)
from guardrail import GuardedOutput, GuardRequest
from guardrail.backends import Sampling
from guardrail.errors import InvalidInputError
from guardrail.limits import parse_json
from guardrail.service import Call


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
    min_tokens: int | None = Field(default=None, ge=0)  # vLLM's extension: no stop before
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    n: Literal[1] | None = None
    user: str | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[int, float] | None = None  # token id (as text in JSON) -> [-100, 100]
    top_k: int | None = Field(default=None, ge=-1)  # vLLM's extensions: -1, 0: all tokens
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, logprobs: bool | None) -> bool | None:
        if logprobs:
            raise ValueError("logprobs are not supported by this server")
        return logprobs

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > 4:
            raise ValueError("at most 4 stop sequences")
        return stop

    def guard_call(self, app: str, max_tokens: int, answer_by: float, fetcher: Any) -> Call:
        """The guard service's call for this body (``max_tokens`` already checked; the answer
        ends by ``answer_by``, a ``time.monotonic()`` instant, image fetches included)."""
        tools = [dict(t) for t in self.tools or []]
        if self.tool_choice is not None and not tools:
            raise InvalidInputError("tool_choice needs tools")
        choice = tool_choice_value(self.tool_choice, tools)
        constraint = answer_constraint(tools, choice, self.response_format)
        conversation = openai_conversation(self.messages, fetcher)
        request = GuardRequest(
            conversation.messages,
            conversation.images,
            tools=() if choice == "none" else tools,
            constraint=constraint,
        )
        temperature = self.temperature or 0.0
        sampled = temperature > 0
        sampling = Sampling(
            max_new_tokens=max_tokens,
            temperature=temperature,
            top_p=self.top_p if self.top_p is not None and sampled else 1.0,
            top_k=self.top_k if self.top_k and self.top_k > 0 and sampled else None,
            min_p=(self.min_p or 0.0) if sampled else 0.0,
            seed=self.seed,
            min_new_tokens=min(self.min_tokens or 0, max_tokens),
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0,
            logit_bias=tuple(sorted((self.logit_bias or {}).items())),
        )
        stops = tuple(self.stops or ())
        left = answer_by - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request's deadline passed while reading its images")
        return Call(app, request, sampling, tuple(conversation.sources), None, stops, left)

    @property
    def stops(self) -> list[str] | None:
        return [self.stop] if isinstance(self.stop, str) else self.stop

    @property
    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def openai_conversation(messages: list[dict[str, Any]], fetcher: Any) -> Conversation:
    """OpenAI chat messages (text and ``image_url`` parts, tool calls and tool results) as a
    conversation; an image in a tool result has the source ``tool``."""
    conversation = Conversation()
    for message in messages:
        role = message.get("role")
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise InvalidInputError(f"unknown message role {role!r}")
        content = message.get("content")
        parts: list[dict[str, Any]] = []
        if isinstance(content, str):
            parts.append({"type": "text", "text": content})
        elif content is not None and not isinstance(content, list):
            raise InvalidInputError("message content must be text or a list of parts")
        for part in content if isinstance(content, list) else []:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image_url":
                url = part.get("image_url")
                data, source = image_from_url(
                    url.get("url") if isinstance(url, dict) else url, fetcher
                )
                parts.append(conversation.image_part(data, source, role))
            else:
                raise UnsupportedContentError(f"content part of type {kind!r} is not supported")
        extra: dict[str, Any] = {}
        if role == "assistant" and message.get("tool_calls"):
            extra["tool_calls"] = [_engine_call(call) for call in message["tool_calls"]]
        if role == "tool":
            extra["tool_call_id"] = message.get("tool_call_id")
            if message.get("name"):
                extra["name"] = message["name"]
        conversation.add("system" if role == "developer" else role, parts, **extra)
    return conversation


def _engine_call(call: Any) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise InvalidInputError("an assistant tool call needs a function name")
    arguments = function.get("arguments") or "{}"
    parsed = (
        parse_json(arguments, "tool call arguments") if isinstance(arguments, str) else arguments
    )
    return {
        "type": "function",
        "id": call.get("id"),
        "function": {"name": function["name"], "arguments": parsed},
    }


def _tool_calls(output: GuardedOutput) -> list[dict[str, Any]]:
    """The answer's tool calls; a call cut short by the token limit too, with the beginning
    of its arguments, as OpenAI sends it (``finish_reason`` says ``length``)."""
    calls = [
        {
            "id": call.id,
            "type": "function",
            "function": {"name": call.name, "arguments": json.dumps(call.arguments)},
        }
        for call in output.tool_calls
    ]
    if output.finish_reason == "length":
        calls += [
            {
                "id": cut.id,
                "type": "function",
                "function": {"name": cut.name, "arguments": cut.arguments or ""},
            }
            for cut in output.invalid_tool_calls
            if cut.name is not None
        ]
    return calls


def completion(output: GuardedOutput, model: str) -> dict[str, Any]:
    """A ``chat.completion`` object, with the decision record as the extra field ``safety``."""
    safety = output.decision.model_dump(mode="json")
    body: dict[str, Any] = {"role": "assistant", "content": output.answer or None}
    if calls := _tool_calls(output):
        body["tool_calls"] = calls
    return {
        "id": f"chatcmpl-{safety['call_id']}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": body, "finish_reason": output.finish_reason}],
        "usage": usage(output),
        "safety": safety,
    }


def usage(output: GuardedOutput) -> dict[str, int]:
    return output.usage.model_dump()


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


def final_delta(output: GuardedOutput) -> dict[str, Any]:
    """The last streamed delta: the answer's tool calls, each whole."""
    calls = _tool_calls(output)
    return {"tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]} if calls else {}


def error_body(
    message: str, kind: str, code: str | None = None, param: str | None = None, **extra: Any
) -> dict[str, Any]:
    """An OpenAI-style error object (``param``: the request field at fault, if one is)."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}, **extra}
