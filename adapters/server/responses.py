"""``POST /v1/responses``: OpenAI's Responses API, stateless. The input items become a chat
conversation (``instructions`` its system message) and run as a chat completion; the answer is
a ``Response`` (or its typed stream events) as the openai package's models define them.
Nothing is stored: ``previous_response_id`` is refused, ``store`` is accepted and moot."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

from openai.types.responses import Response, ResponseStreamEvent
from pydantic import Field, TypeAdapter, field_validator

from adapters.conversation import UnsupportedContentError
from adapters.remote_images import RemoteImageFetcher
from adapters.server.chat import ChatCompletionRequest, tool_calls
from adapters.server.protocol import SamplingFields, chat_logprob, sse
from guardrail import GuardedOutput
from guardrail.errors import InvalidInputError
from guardrail.service import Call, Delta

_EVENT = TypeAdapter[Any](ResponseStreamEvent)
_SAMPLING = set(SamplingFields.model_fields) - {"model", "n", "stop", "stream_options"}


class ResponsesRequest(SamplingFields):
    """The body of ``POST /v1/responses`` (text and image input, function tools, structured
    text, streaming); the sampling fields of chat completions, except ``n`` and ``stop``."""

    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    store: bool | None = None
    metadata: dict[str, str] | None = None
    truncation: str | None = None
    include: list[str] | None = None
    previous_response_id: None = None
    reasoning: None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("the Responses API answers with one choice")
        return n

    @field_validator("stop")
    @classmethod
    def _no_stop(cls, stop: Any) -> Any:
        if stop is not None:
            raise ValueError("the Responses API takes no stop sequences")
        return stop

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        if isinstance(choice, str) and choice not in ("none", "auto", "required"):
            raise ValueError("tool_choice is 'none', 'auto', 'required' or a function")
        if isinstance(choice, dict) and not (
            choice.get("type") == "function" and isinstance(choice.get("name"), str)
        ):
            raise ValueError("a tool_choice object is {'type': 'function', 'name': ...}")
        return choice

    @field_validator("truncation")
    @classmethod
    def _no_truncation(cls, truncation: str | None) -> str | None:
        if truncation not in (None, "disabled"):
            raise ValueError("only truncation 'disabled' is supported")
        return truncation

    @property
    def requested_tokens(self) -> int | None:
        return self.max_output_tokens

    def as_chat(self) -> ChatCompletionRequest:
        """The same request as a chat completion."""
        settings = {
            name: getattr(self, name) for name in _SAMPLING if name in self.model_fields_set
        }
        return ChatCompletionRequest(
            model=self.model,
            messages=chat_messages(self.input, self.instructions),
            max_completion_tokens=self.max_output_tokens,
            tools=[_chat_tool(tool) for tool in self.tools or []] or None,
            tool_choice=_chat_tool_choice(self.tool_choice),
            parallel_tool_calls=self.parallel_tool_calls,
            response_format=_response_format(self.text),
            logprobs=self.top_logprobs is not None or None,
            top_logprobs=self.top_logprobs,
            **settings,
        )

    def guard_calls(
        self, app: str, max_tokens: int, answer_by: float, fetcher: RemoteImageFetcher
    ) -> list[Call]:
        return self.as_chat().guard_calls(app, max_tokens, answer_by, fetcher)

    def response(self, outputs: Sequence[GuardedOutput], model: str) -> dict[str, Any]:
        (output,) = outputs
        return self.response_object(output, model, _items(output))

    def response_object(
        self, output: GuardedOutput | None, model: str, items: list[dict[str, Any]]
    ) -> dict[str, Any]:
        """A ``response`` object: in progress (no output yet), or finished with ``items``."""
        body: dict[str, Any] = {
            "id": f"resp_{output.decision.call_id if output else uuid.uuid4().hex}",
            "object": "response",
            "created_at": time.time(),
            "model": model,
            "output": items,
            "status": "in_progress",
            "instructions": self.instructions,
            "parallel_tool_calls": self.parallel_tool_calls is not False,
            "tool_choice": self.tool_choice or "auto",
            "tools": self.tools or [],
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_output_tokens": self.max_output_tokens,
            "metadata": self.metadata,
            "text": self.text or {"format": {"type": "text"}},
            "previous_response_id": None,
        }
        if output is not None:
            cut = output.finish_reason == "length"
            body["status"] = "incomplete" if cut else "completed"
            body["incomplete_details"] = {"reason": "max_output_tokens"} if cut else None
            used = output.usage
            body["usage"] = {
                "input_tokens": used.prompt_tokens,
                "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                "output_tokens": used.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": used.total_tokens,
            }
            body["safety"] = output.decision.model_dump(mode="json")
        return Response.model_validate(body).model_dump(
            mode="json", exclude_unset=True, by_alias=True
        )

    def streamer(self, model: str) -> ResponseStream:
        return ResponseStream(self, model)


class ResponseStream:
    """The Responses API's typed events: created, the message's text deltas as they become
    final, then its end, each function call whole, and ``response.completed`` (or
    ``response.incomplete``) with the decision record in its response."""

    def __init__(self, request: ResponsesRequest, model: str) -> None:
        self.request, self.model = request, model
        self.sequence = 0
        self.message_id = f"msg_{uuid.uuid4().hex}"
        self.text: str | None = None  # the message's text so far, once it is open

    def start(self) -> list[str]:
        response = self.request.response_object(None, self.model, [])
        return [
            self._event("response.created", response=response),
            self._event("response.in_progress", response=response),
        ]

    def delta(self, delta: Delta) -> list[str]:
        events = self._open() if self.text is None else []
        self.text = (self.text or "") + delta.text
        events.append(
            self._event(
                "response.output_text.delta",
                item_id=self.message_id,
                output_index=0,
                content_index=0,
                delta=delta.text,
                logprobs=[],
            )
        )
        return events

    def end(self, output: GuardedOutput) -> list[str]:
        events: list[str] = []
        items: list[dict[str, Any]] = []
        if self.text is not None or not output.tool_calls:
            if self.text is None:
                events += self._open()
            message = _message(self.message_id, self.text or "", output)
            part, place = message["content"][0], {"item_id": self.message_id, "output_index": 0}
            events += [
                self._event(
                    "response.output_text.done",
                    **place,
                    content_index=0,
                    text=part["text"],
                    logprobs=part.get("logprobs", []),
                ),
                self._event("response.content_part.done", **place, content_index=0, part=part),
                self._event("response.output_item.done", output_index=0, item=message),
            ]
            items.append(message)
        for call in _function_calls(output):
            index, place = len(items), {"item_id": call["id"], "output_index": len(items)}
            events += [
                self._event(
                    "response.output_item.added",
                    output_index=index,
                    item={**call, "arguments": "", "status": "in_progress"},
                ),
                self._event(
                    "response.function_call_arguments.delta", **place, delta=call["arguments"]
                ),
                self._event(
                    "response.function_call_arguments.done", **place, arguments=call["arguments"]
                ),
                self._event("response.output_item.done", output_index=index, item=call),
            ]
            items.append(call)
        response = self.request.response_object(output, self.model, items)
        kind = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
        return [*events, self._event(kind, response=response)]

    def done(self) -> list[str]:
        return []

    def _open(self) -> list[str]:
        self.text = ""
        item = {
            "type": "message",
            "id": self.message_id,
            "role": "assistant",
            "status": "in_progress",
            "content": [],
        }
        part = {"type": "output_text", "text": "", "annotations": []}
        return [
            self._event("response.output_item.added", output_index=0, item=item),
            self._event(
                "response.content_part.added",
                item_id=self.message_id,
                output_index=0,
                content_index=0,
                part=part,
            ),
        ]

    def _event(self, kind: str, **fields: Any) -> str:
        body = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        event = _EVENT.validate_python(body)
        return sse(event.model_dump(mode="json", exclude_unset=True, by_alias=True), kind)


def _items(output: GuardedOutput) -> list[dict[str, Any]]:
    """A finished answer's output items: its message (unless it is tool calls alone), then
    its function calls."""
    items = []
    if output.answer or not output.tool_calls:
        items.append(_message(f"msg_{uuid.uuid4().hex}", output.answer, output))
    return items + _function_calls(output)


def _message(item_id: str, text: str, output: GuardedOutput) -> dict[str, Any]:
    part: dict[str, Any] = {"type": "output_text", "text": text, "annotations": []}
    if output.logprobs is not None:
        part["logprobs"] = [chat_logprob(entry) for entry in output.logprobs]
    return {
        "type": "message",
        "id": item_id,
        "role": "assistant",
        "status": "incomplete" if output.finish_reason == "length" else "completed",
        "content": [part],
    }


def _function_calls(output: GuardedOutput) -> list[dict[str, Any]]:
    return [
        {
            "type": "function_call",
            "id": f"fc_{call['id']}",
            "call_id": call["id"],
            "name": call["function"]["name"],
            "arguments": call["function"]["arguments"],
            "status": "completed",
        }
        for call in tool_calls(output)
    ]


def chat_messages(items: str | list[dict[str, Any]], instructions: str | None) -> list[Any]:
    """Responses input items as chat messages (consecutive function calls join one assistant
    message; a function call's output is a tool message)."""
    messages: list[dict[str, Any]] = []
    if instructions:
        messages.append({"role": "system", "content": instructions})
    if isinstance(items, str):
        return [*messages, {"role": "user", "content": items}]
    for item in items:
        kind = item.get("type", "message")
        if kind == "message":
            content = item.get("content")
            parts = content if isinstance(content, str) else [_chat_part(p) for p in content or []]
            messages.append({"role": item.get("role"), "content": parts})
        elif kind == "function_call":
            call = {
                "id": item.get("call_id"),
                "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments")},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            content = output if isinstance(output, str) else [_chat_part(p) for p in output or []]
            messages.append(
                {"role": "tool", "tool_call_id": item.get("call_id"), "content": content}
            )
        else:
            raise UnsupportedContentError(f"input item of type {kind!r} is not supported")
    return messages


def _chat_part(part: Any) -> dict[str, Any]:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in ("input_text", "output_text") and isinstance(part.get("text"), str):
        return {"type": "text", "text": part["text"]}
    if kind == "refusal" and isinstance(part.get("refusal"), str):
        return {"type": "text", "text": part["refusal"]}
    if kind == "input_image" and part.get("image_url"):
        return {"type": "image_url", "image_url": {"url": part["image_url"]}}
    raise UnsupportedContentError(f"content part of type {kind!r} is not supported")


def _chat_tool(tool: dict[str, Any]) -> dict[str, Any]:
    if tool.get("type") != "function":
        raise InvalidInputError(f"tools of type {tool.get('type')!r} are not supported")
    function = {k: v for k, v in tool.items() if k != "type"}
    return {"type": "function", "function": function}


def _chat_tool_choice(choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


def _response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    """``text.format`` as a chat ``response_format``."""
    if not text or not text.get("format"):
        return None
    form = dict(text["format"])
    if form.get("type") == "json_schema":
        spec = {k: v for k, v in form.items() if k != "type"}
        return {"type": "json_schema", "json_schema": spec}
    return form
