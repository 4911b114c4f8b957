"""How a model family writes tool calls: a registry of formats (as vLLM's tool parsers are).

A :class:`ToolCallFormat` says where calls begin in an answer (``marker``: streaming holds text
back from there), what one call looks like (``prefix``, the JSON object with ``name`` and
``arguments_key``, ``suffix``: constrained decoding writes exactly that), how earlier calls and
the tool listing are written for a chat template that does not take tools, and parses calls
out of an answer. A :class:`~guardrail.families.ModelFamily` names its format
(``tool_call_format``); Hermes is the default. Add one with :func:`register_tool_format`.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from guardrail.errors import InvalidInputError
from guardrail.tools import InvalidToolCall, Tool, ToolCall, tool_name


@dataclass(frozen=True)
class ToolCallFormat:
    """One way of writing tool calls (see the module docstring). With ``in_json``, the marker
    is the start of the call's JSON itself (Llama 3's ``{"name"``); ``listed``: the calls after
    one marker form a JSON list (Mistral's ``[TOOL_CALLS][...]``)."""

    name: str
    marker: str
    prefix: str
    suffix: str
    instructions: str  # the tool listing for the system turn: "{tools}" is replaced
    arguments_key: str = "arguments"
    close: str = ""  # what ends a block of calls, if anything
    in_json: bool = False
    listed: bool = False

    def write(self, name: str, arguments: Mapping[str, Any]) -> str:
        """One call as the model writes it."""
        body = json.dumps({"name": name, self.arguments_key: dict(arguments)})
        return f"{self.prefix}{body}{self.suffix}"

    def listing(self, tools: Sequence[Tool]) -> str:
        return self.instructions.replace("{tools}", "\n".join(json.dumps(dict(t)) for t in tools))

    def call_schema(self, tools: Sequence[Tool], name: str | None = None) -> dict[str, Any]:
        """JSON schema of one call to any of ``tools`` (or to the one called ``name``)."""
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
                    self.arguments_key: _arguments_schema(tool),
                },
                "required": ["name", self.arguments_key],
                "additionalProperties": False,
            }
            for tool in chosen
        ]
        return options[0] if len(options) == 1 else {"anyOf": options}

    def parse(
        self, text: str, tools: Sequence[Tool]
    ) -> tuple[str, list[ToolCall], list[InvalidToolCall]]:
        """Split an answer into its text and its calls (the last block may be cut short when
        generation stopped in it); a block that is not JSON naming one of ``tools`` with an
        object of arguments is returned as an :class:`InvalidToolCall`."""
        known = {tool_name(tool) for tool in tools}
        calls: list[ToolCall] = []
        invalid: list[InvalidToolCall] = []
        kept, position = [], 0
        for start, end, body in self._blocks(text):
            kept.append(text[position:start])
            position = end
            try:
                value, _ = json.JSONDecoder().raw_decode(body)
            except json.JSONDecodeError as e:
                invalid.append(self._cut_short(body, f"not JSON: {e}"))
                continue
            for item in value if self.listed and isinstance(value, list) else [value]:
                found = self._call(item, body, known)
                (calls if isinstance(found, ToolCall) else invalid).append(found)  # type: ignore[arg-type]
        if not calls and not invalid:
            return text, [], []
        return "".join([*kept, text[position:]]).strip(), calls, invalid

    def _cut_short(self, body: str, error: str) -> InvalidToolCall:
        """A block that is not (yet) JSON, with the tool's name and the beginning of its
        arguments when they can be read off it (a call cut short by the token limit)."""
        name = re.search(r'"name"\s*:\s*"([^"\\]*)"', body)
        keys = "|".join(re.escape(k) for k in {self.arguments_key, "arguments", "parameters"})
        arguments = re.search(rf'"(?:{keys})"\s*:\s*', body)
        return InvalidToolCall(
            body,
            error,
            name.group(1) if name else None,
            arguments=body[arguments.end() :] if arguments else None,
        )

    def _blocks(self, text: str) -> list[tuple[int, int, str]]:
        """(start, end, JSON text) of each block of calls in ``text``."""
        starts, at = [], text.find(self.marker)
        while at >= 0:
            starts.append(at)
            at = text.find(self.marker, at + len(self.marker))
        blocks = []
        for k, start in enumerate(starts):
            body_start = start if self.in_json else start + len(self.marker)
            limit = starts[k + 1] if k + 1 < len(starts) else len(text)
            closed = text.find(self.close, body_start, limit) if self.close else -1
            body_end, end = (closed, closed + len(self.close)) if closed >= 0 else (limit, limit)
            blocks.append((start, end, text[body_start:body_end].strip().rstrip(";").strip()))
        return blocks

    def _call(self, item: Any, body: str, known: set[str]) -> ToolCall | InvalidToolCall:
        data = item if isinstance(item, dict) else {}
        name = data.get("name")
        arguments = data.get(self.arguments_key, data.get("arguments", data.get("parameters")))
        if isinstance(arguments, str):
            with contextlib.suppress(json.JSONDecodeError, RecursionError):
                arguments = json.loads(arguments)
        if not isinstance(name, str) or name not in known:
            return InvalidToolCall(body, f"unknown tool {name!r}", name)
        if not isinstance(arguments, dict):
            return InvalidToolCall(body, "arguments are not a JSON object", name)
        return ToolCall(name, arguments)


def _arguments_schema(tool: Tool) -> dict[str, Any]:
    """A tool's parameter schema; one that names no parameters takes none (``{}``)."""
    parameters = dict(tool["function"].get("parameters") or {})
    if not parameters.get("properties"):
        return {"type": "object", "properties": {}, "additionalProperties": False}
    return parameters


HERMES = ToolCallFormat(
    name="hermes",
    marker="<tool_call>",
    prefix="<tool_call>\n",
    suffix="\n</tool_call>",
    close="</tool_call>",
    instructions=(
        "You may call one or more functions to assist with the user query. The function "
        "signatures are within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
        "For each function call, return a JSON object with the function name and arguments "
        "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
    ),
)
# Llama 3.1+ (and Llama 3.2 Vision): a bare JSON object with "parameters".
LLAMA3_JSON = ToolCallFormat(
    name="llama3_json",
    marker='{"name"',
    prefix="",
    suffix="",
    arguments_key="parameters",
    in_json=True,
    instructions=(
        "Given the following functions, please respond with a JSON for a function call with "
        "its proper arguments that best answers the given prompt.\n\nRespond in the format "
        '{"name": function name, "parameters": dictionary of argument name and its value}. '
        "Do not use variables.\n\n{tools}"
    ),
)
# Mistral: the [TOOL_CALLS] token, then a JSON list of calls.
MISTRAL = ToolCallFormat(
    name="mistral",
    marker="[TOOL_CALLS]",
    prefix="[TOOL_CALLS][",
    suffix="]",
    listed=True,
    instructions=(
        "[AVAILABLE_TOOLS]\n{tools}\n[/AVAILABLE_TOOLS]\nTo call tools, answer [TOOL_CALLS] "
        'followed by a JSON list of {"name": ..., "arguments": {...}} objects.'
    ),
)
TOOL_FORMATS: dict[str, ToolCallFormat] = {f.name: f for f in (HERMES, LLAMA3_JSON, MISTRAL)}


def register_tool_format(fmt: ToolCallFormat) -> None:
    """Make ``fmt`` available by its name (to ``ModelFamily(tool_call_format=...)``)."""
    TOOL_FORMATS[fmt.name] = fmt


def tool_format(name: str | None) -> ToolCallFormat:
    """The format called ``name`` (Hermes for None)."""
    if name is None:
        return HERMES
    if name not in TOOL_FORMATS:
        raise InvalidInputError(f"no tool call format {name!r}; known: {sorted(TOOL_FORMATS)}")
    return TOOL_FORMATS[name]
