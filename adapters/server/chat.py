"""``POST /v1/chat/completions``: OpenAI chat messages in, ``ChatCompletion`` (or its chunks)
out, as the openai package's own models define them."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import Field, model_validator

from adapters.conversation import (
    Conversation,
    UnsupportedContentError,
    answer_constraint,
    image_from_url,
    tool_choice_value,
)
from adapters.remote_images import RemoteImageFetcher
from adapters.server.protocol import ChunkStream, SamplingFields, chat_logprob, usage
from guardrail import GuardedOutput, GuardRequest
from guardrail.errors import InvalidInputError
from guardrail.limits import parse_json
from guardrail.service import Call, Delta


class ChatCompletionRequest(SamplingFields):
    """The body of ``POST /v1/chat/completions``. Fields the server cannot honour are refused
    (400)."""

    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @property
    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def guard_calls(
        self, app: str, max_tokens: int, answer_by: float, fetcher: RemoteImageFetcher
    ) -> list[Call]:
        """The guard call of this body (``max_tokens`` already checked; the answer ends by
        ``answer_by``, a ``time.monotonic()`` instant, image fetches included)."""
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
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        sampling = self.sampling(max_tokens, logprobs)
        left = answer_by - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request's deadline passed while reading its images")
        sources = tuple(conversation.sources)
        return [Call(app, request, sampling, sources, None, self.stops, left, self.n)]

    def response(self, outputs: Sequence[GuardedOutput], model: str) -> dict[str, Any]:
        """A ``chat.completion``, with the decision record as the extra field ``safety``."""
        (output,) = outputs
        safety = output.decision.model_dump(mode="json")
        choices = []
        for index, choice in enumerate(output.choices):
            message: dict[str, Any] = {"role": "assistant", "content": choice.answer or None}
            if calls := tool_calls(choice):
                message["tool_calls"] = calls
            choices.append(
                {
                    "index": index,
                    "message": message,
                    "finish_reason": choice.finish_reason,
                    "logprobs": _logprobs(choice),
                }
            )
        body = {
            "id": f"chatcmpl-{safety['call_id']}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": choices,
            "usage": usage(output),
            "safety": safety,
        }
        return ChatCompletion.model_validate(body).model_dump(
            mode="json", exclude_unset=True, by_alias=True
        )

    def streamer(self, model: str) -> ChatStream:
        return ChatStream(model, self.include_usage)


class ChatStream(ChunkStream):
    """``chat.completion.chunk`` events; a choice's last chunk carries its tool calls (each
    whole), finish reason and log-probabilities."""

    kind, prefix = "chat.completion.chunk", "chatcmpl"

    def __init__(self, model: str, include_usage: bool) -> None:
        super().__init__(model, include_usage)
        self.opened: set[int] = set()

    def text_entry(self, delta: Delta) -> dict[str, Any]:
        return self._entry(delta.choice, {"content": delta.text})

    def last_entry(self, index: int, choice: GuardedOutput) -> dict[str, Any]:
        content: dict[str, Any] = {}
        if calls := tool_calls(choice):
            content["tool_calls"] = [{"index": i, **call} for i, call in enumerate(calls)]
        entry = self._entry(index, content, choice.finish_reason)
        if choice.logprobs is not None:
            entry["logprobs"] = _logprobs(choice)
        return entry

    def checked(self, body: dict[str, Any]) -> dict[str, Any]:
        chunk = ChatCompletionChunk.model_validate(body)
        return chunk.model_dump(mode="json", exclude_unset=True, by_alias=True)

    def _entry(
        self, index: int, content: dict[str, Any], finish: str | None = None
    ) -> dict[str, Any]:
        if index not in self.opened:
            self.opened.add(index)
            content = {"role": "assistant", **content}
        return {"index": index, "delta": content, "finish_reason": finish}


def _logprobs(choice: GuardedOutput) -> dict[str, Any] | None:
    if choice.logprobs is None:
        return None
    return {"content": [chat_logprob(entry) for entry in choice.logprobs], "refusal": None}


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
            extra["tool_calls"] = [engine_call(call) for call in message["tool_calls"]]
        if role == "tool":
            extra["tool_call_id"] = message.get("tool_call_id")
            if message.get("name"):
                extra["name"] = message["name"]
        conversation.add("system" if role == "developer" else role, parts, **extra)
    return conversation


def engine_call(call: Any) -> dict[str, Any]:
    """An OpenAI tool call of an assistant message as the engine's tool call."""
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


def tool_calls(output: GuardedOutput) -> list[dict[str, Any]]:
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
