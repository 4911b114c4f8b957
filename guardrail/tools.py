"""Tools and tool calls: definitions, calls, and the conversation helpers around them.

Tools are OpenAI-style function definitions (``{"type": "function", "function": {"name",
"description", "parameters"}}``). Conversations carry them the way transformers chat templates
expect: an assistant message may hold ``tool_calls`` (``{"type": "function", "id",
"function": {"name", "arguments": {...}}}``) and a ``tool`` message holds a tool's result.

A chat template that takes ``tools`` renders all of this itself. For one that does not (it
would silently drop them), :func:`prompt_messages` writes it into the conversation in the
model family's tool-call format (:mod:`guardrail.tool_formats`; Hermes by default):

* the tool listing at the end of the system turn (a system turn is added if there is none);
* each earlier tool call written as the format writes calls, in the assistant's text;
* each tool result as a user turn ``<tool_response>...</tool_response>`` (its images kept).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from guardrail.errors import InvalidInputError
from guardrail.limits import parse_json

Tool = Mapping[str, Any]
Message = dict[str, Any]


class CallWriter(Protocol):
    """What :func:`prompt_messages` needs of a tool-call format."""

    def write(self, name: str, arguments: Mapping[str, Any]) -> str: ...

    def listing(self, tools: Sequence[Tool]) -> str: ...


@dataclass(frozen=True)
class ToolCall:
    """One call the model made: the tool's ``name``, its ``arguments`` and a call ``id``."""

    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


@dataclass(frozen=True)
class InvalidToolCall:
    """A tool call in the answer that could not be read as a call to one of the tools."""

    text: str
    error: str
    name: str | None = None
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")
    arguments: str | None = None  # a call cut short: the beginning of its arguments' JSON


def tool_name(tool: Tool) -> str:
    """The function name of an OpenAI-style tool definition."""
    return str(tool["function"]["name"])


def check_tools(tools: Sequence[Tool], unique: bool = True) -> None:
    """Raise :class:`InvalidInputError` unless every tool is a named function definition (with
    ``unique``, each name once: a request may not offer two tools of one name)."""
    names = []
    for tool in tools:
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(function, Mapping) or tool.get("type") != "function":
            raise InvalidInputError(f"a tool must be an OpenAI function definition, not {tool!r}")
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise InvalidInputError("every tool needs a function name")
        names.append(function["name"])
    if unique and len(set(names)) != len(names):
        raise InvalidInputError(f"tool names must be unique, got {names}")


def takes_tools(chat_template: str | None) -> bool:
    """Whether a chat template renders a ``tools`` variable (transformers ignores it silently
    otherwise)."""
    if not chat_template:
        return False
    from jinja2 import Environment, meta

    return "tools" in meta.find_undeclared_variables(Environment().parse(chat_template))


def prompt_messages(
    messages: Sequence[Message], tools: Sequence[Tool], fmt: CallWriter
) -> list[Message]:
    """``messages`` with tools, tool calls and tool results written as text in ``fmt`` (for a
    template that does not take tools); see the module docstring."""
    out: list[Message] = []
    for message in messages:
        if message["role"] == "tool":
            _append_tool_response(out, message)
            continue
        calls = message.get("tool_calls") or []
        message = {k: v for k, v in message.items() if k not in ("tool_calls", "tool_call_id")}
        if calls:
            written = "\n".join(_written_call(call, fmt) for call in calls)
            message["content"] = _joined(message.get("content") or "", written)
        out.append(message)
    out = [_settled(message) for message in out]
    if not tools:
        return out
    listing = fmt.listing(tools)
    if out and out[0]["role"] == "system":
        out[0] = {**out[0], "content": _joined(out[0]["content"], listing, "\n\n")}
    else:
        out.insert(0, {"role": "system", "content": listing})
    return out


def _written_call(call: Mapping[str, Any], fmt: CallWriter) -> str:
    function = call.get("function", call)
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        arguments = parse_json(arguments, "tool call arguments") if arguments.strip() else {}
    return fmt.write(function["name"], arguments)


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
