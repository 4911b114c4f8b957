"""Output constraints: what an answer must look like, checked token by token while decoding."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from guardrail.errors import InvalidInputError
from guardrail.tools import Tool, check_tools


@dataclass(frozen=True)
class JsonForm:
    """JSON matching ``schema`` (serialised; any JSON object when None), written between the
    literal ``prefix`` and ``suffix``. A ``tool_call`` form is one call in the model's own
    tool-call format: ``schema`` then holds ``{"tools": [...], "name": ...}`` and the backend
    writes the call's schema, prefix and suffix from its format."""

    schema: str | None = None
    prefix: str = ""
    suffix: str = ""
    tool_call: bool = False


@dataclass(frozen=True)
class OutputConstraint:
    """An answer in one of ``forms``. The backend enforces it with a grammar."""

    forms: tuple[JsonForm, ...]

    @classmethod
    def json_schema(cls, schema: Mapping[str, Any]) -> OutputConstraint:
        """JSON that validates against ``schema``."""
        return cls((JsonForm(json.dumps(schema)),))  # key order kept: the order generated

    @classmethod
    def any_json(cls) -> OutputConstraint:
        """Any JSON object (JSON mode)."""
        return cls((JsonForm(),))

    @classmethod
    def tool_call(cls, tools: Sequence[Tool], name: str | None = None) -> OutputConstraint:
        """One call, in the model's tool-call format, to one of ``tools`` (the one called
        ``name``)."""
        check_tools(tools)
        if name is not None and name not in {t["function"]["name"] for t in tools}:
            raise InvalidInputError(f"tool_choice names {name!r}, which is not among the tools")
        spec = json.dumps({"tools": [dict(t) for t in tools], "name": name})
        return cls((JsonForm(spec, tool_call=True),))

    def or_else(self, other: OutputConstraint) -> OutputConstraint:
        """An answer in a form of this constraint or of ``other`` (a tool call, or a final
        answer in a schema)."""
        return OutputConstraint(self.forms + other.forms)
