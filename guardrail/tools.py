"""Tools in the prompt and tool calls in the answer.

Tools are OpenAI-style function definitions (``{"type": "function", "function": {"name",
"description", "parameters"}}``). Conversations carry them the way transformers chat templates
expect: an assistant message may hold ``tool_calls`` (``{"type": "function", "id",
"function": {"name", "arguments": {...}}}``) and a ``tool`` message holds a tool's result.

A chat template that takes ``tools`` renders all of this itself. For one that does not (it
would silently drop them), :func:`prompt_messages` writes the documented format below into the
conversation, the one Hermes-style models (Qwen2.5, SmolLM3...) are trained on:

* the tool definitions, one JSON object per line inside ``<tools></tools>``, at the end of the
  system turn (a system turn is added if there is none);
* each earlier tool call as ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` in the
  assistant's text;
* each tool result as a user turn ``<tool_response>...</tool_response>`` (its images kept).

Answers are parsed from the same ``<tool_call>`` format (:func:`parse_tool_calls`).
"""

from __future__ import annotations

import contextlib
import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from guardrail.errors import InvalidInputError

Tool = Mapping[str, Any]
Message = dict[str, Any]

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
_TOOL_CALL = re.compile(
    re.escape(TOOL_CALL_OPEN) + r"\s*(.*?)\s*(?:" + re.escape(TOOL_CALL_CLOSE) + r"|\Z)", re.S
)
TOOL_INSTRUCTIONS = (
    "You may call one or more functions to assist with the user query. The function "
    "signatures are within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a JSON object with the function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{{"name": <function-name>, "arguments": '
    "<args-json-object>}}\n</tool_call>"
)


@dataclass(frozen=True)
class ToolCall:
    """One call the model made: the tool's ``name``, its ``arguments`` and a call ``id``."""

    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


@dataclass(frozen=True)
class InvalidToolCall:
    """A ``<tool_call>`` block that could not be read as a call to one of the tools."""

    text: str
    error: str
    name: str | None = None
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


def tool_name(tool: Tool) -> str:
    """The function name of an OpenAI-style tool definition."""
    return str(tool["function"]["name"])


def check_tools(tools: Sequence[Tool]) -> None:
    """Raise :class:`InvalidInputError` unless every tool is a named function definition."""
    names = []
    for tool in tools:
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if tool.get("type") != "function" or not isinstance(function, Mapping):
            raise InvalidInputError(f"a tool must be an OpenAI function definition, not {tool!r}")
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise InvalidInputError("every tool needs a function name")
        names.append(function["name"])
    if len(set(names)) != len(names):
        raise InvalidInputError(f"tool names must be unique, got {names}")


def takes_tools(chat_template: str | None) -> bool:
    """Whether a chat template renders a ``tools`` variable (transformers ignores it silently
    otherwise)."""
    if not chat_template:
        return False
    from jinja2 import Environment, meta

    return "tools" in meta.find_undeclared_variables(Environment().parse(chat_template))


def prompt_messages(messages: Sequence[Message], tools: Sequence[Tool]) -> list[Message]:
    """``messages`` with tools, tool calls and tool results written as text (for a template
    that does not take tools); see the module docstring for the format."""
    out: list[Message] = []
    for message in messages:
        if message["role"] == "tool":
            _append_tool_response(out, message)
            continue
        calls = message.get("tool_calls") or []
        message = {k: v for k, v in message.items() if k not in ("tool_calls", "tool_call_id")}
        if calls:
            written = "\n".join(_written_call(call) for call in calls)
            message["content"] = _joined(message.get("content") or "", written)
        out.append(message)
    out = [_settled(message) for message in out]
    if not tools:
        return out
    listing = TOOL_INSTRUCTIONS.format(tools="\n".join(json.dumps(dict(t)) for t in tools))
    if out and out[0]["role"] == "system":
        out[0] = {**out[0], "content": _joined(out[0]["content"], listing, "\n\n")}
    else:
        out.insert(0, {"role": "system", "content": listing})
    return out


def parse_tool_calls(
    text: str, tools: Sequence[Tool]
) -> tuple[str, list[ToolCall], list[InvalidToolCall]]:
    """Split an answer into its text and its ``<tool_call>`` blocks (the last may lack its
    closing tag when generation stopped after it); a block that is not JSON naming one of
    ``tools`` with an object of arguments is returned as an :class:`InvalidToolCall`."""
    known = {tool_name(tool) for tool in tools}
    calls: list[ToolCall] = []
    invalid: list[InvalidToolCall] = []
    for block in _TOOL_CALL.findall(text):
        try:
            data = json.loads(block)
        except json.JSONDecodeError as e:
            invalid.append(InvalidToolCall(block, f"not JSON: {e}"))
            continue
        name = data.get("name") if isinstance(data, dict) else None
        arguments = data.get("arguments", data.get("parameters")) if isinstance(data, dict) else {}
        if isinstance(arguments, str):
            with contextlib.suppress(json.JSONDecodeError):
                arguments = json.loads(arguments)
        if not isinstance(name, str) or name not in known:
            invalid.append(InvalidToolCall(block, f"unknown tool {name!r}", name))
        elif not isinstance(arguments, dict):
            invalid.append(InvalidToolCall(block, "arguments are not a JSON object", name))
        else:
            calls.append(ToolCall(name, arguments))
    content = _TOOL_CALL.sub("", text).strip() if calls or invalid else text
    return content, calls, invalid


def call_schema(tools: Sequence[Tool], name: str | None = None) -> dict[str, Any]:
    """JSON schema of one call ``{"name": ..., "arguments": {...}}`` to any of ``tools``, or to
    the tool called ``name``."""
    chosen = [tool for tool in tools if name is None or tool_name(tool) == name]
    if not chosen:
        raise InvalidInputError(
            f"tool_choice names {name!r}, which is not among the tools "
            f"{[tool_name(t) for t in tools]}"
        )
    options = [
        {
            "type": "object",
            "properties": {
                "name": {"const": tool_name(tool)},
                "arguments": _arguments_schema(tool),
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for tool in chosen
    ]
    return options[0] if len(options) == 1 else {"anyOf": options}


def _arguments_schema(tool: Tool) -> dict[str, Any]:
    """A tool's parameter schema; one that names no parameters takes none (``{}``)."""
    parameters = dict(tool["function"].get("parameters") or {})
    if not parameters.get("properties"):
        return {"type": "object", "properties": {}, "additionalProperties": False}
    return parameters


def _written_call(call: Mapping[str, Any]) -> str:
    function = call.get("function", call)
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        arguments = json.loads(arguments) if arguments.strip() else {}
    body = json.dumps({"name": function["name"], "arguments": arguments})
    return f"{TOOL_CALL_OPEN}\n{body}\n{TOOL_CALL_CLOSE}"


def _append_tool_response(out: list[Message], message: Message) -> None:
    """A tool result as a user turn; consecutive results share one turn."""
    content = message["content"]
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
    wrapped = [
        {"type": "text", "text": "<tool_response>\n"},
        *parts,
        {"type": "text", "text": "\n</tool_response>"},
    ]
    previous = out[-1] if out else None
    if previous is not None and previous.get("tool_responses"):
        previous["content"] = [*previous["content"], {"type": "text", "text": "\n"}, *wrapped]
        return
    out.append({"role": "user", "content": wrapped, "tool_responses": True})


def _settled(message: Message) -> Message:
    """A merged tool-response turn as a plain message (text parts joined when no image)."""
    if not message.pop("tool_responses", False):
        return message
    parts = message["content"]
    if all(part.get("type") == "text" for part in parts):
        message["content"] = "".join(part["text"] for part in parts)
    return message


def _joined(content: Any, text: str, separator: str = "\n") -> Any:
    if isinstance(content, str):
        return f"{content}{separator}{text}" if content else text
    return [*content, {"type": "text", "text": separator + text}]
