"""Output constraints: what an answer must look like, checked token by token while decoding."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from guardrail.tools import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, Tool, call_schema


@dataclass(frozen=True)
class JsonForm:
    """JSON matching ``schema`` (serialised; any JSON object when None), written between the
    literal ``prefix`` and ``suffix``."""

    schema: str | None = None
    prefix: str = ""
    suffix: str = ""


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
        """One ``<tool_call>`` block calling one of ``tools`` (the one called ``name``)."""
        schema = json.dumps(call_schema(tools, name))
        return cls((JsonForm(schema, f"{TOOL_CALL_OPEN}\n", f"\n{TOOL_CALL_CLOSE}"),))

    def or_else(self, other: OutputConstraint) -> OutputConstraint:
        """An answer in a form of this constraint or of ``other`` (a tool call, or a final
        answer in a schema)."""
        return OutputConstraint(self.forms + other.forms)
