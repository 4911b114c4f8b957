"""What a call returns: the answer text and tokens, token counts and the decision record."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from pydantic import BaseModel

from guardrail.backends.sessions import Answer
from guardrail.decision import GuardDecision
from guardrail.tool_formats import HERMES, ToolCallFormat
from guardrail.tools import InvalidToolCall, Tool, ToolCall

FinishReason = Literal["stop", "length", "tool_calls"]


class Usage(BaseModel):
    """Token counts of one request."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@dataclass(frozen=True)
class GuardedOutput:
    """The answer to one request, with the guard's decision record. ``text`` is the whole
    answer; when tools were offered, ``content`` is its text outside ``tool_calls``."""

    text: str
    token_ids: list[int]
    decision: GuardDecision
    usage: Usage
    finish_reason: FinishReason = "stop"  # length: ended at max_new_tokens
    tool_calls: tuple[ToolCall, ...] = ()
    invalid_tool_calls: tuple[InvalidToolCall, ...] = ()
    content: str | None = None

    @property
    def answer(self) -> str:
        """The answer's text, without its tool calls."""
        return self.text if self.content is None else self.content


def with_tool_calls(
    output: GuardedOutput, tools: Sequence[Tool], fmt: ToolCallFormat = HERMES
) -> GuardedOutput:
    """``output`` with the tool calls in its text (written in ``fmt``) parsed out."""
    content, calls, invalid = fmt.parse(output.text, tools)
    reason: FinishReason = "tool_calls" if calls else output.finish_reason
    return replace(
        output,
        content=content,
        tool_calls=tuple(calls),
        invalid_tool_calls=tuple(invalid),
        finish_reason=reason,
    )


def output_of(
    answer: Answer,
    decision: GuardDecision,
    tokenizer: Any,
    tools: Sequence[Tool] = (),
    text: str | None = None,
    fmt: ToolCallFormat = HERMES,
) -> GuardedOutput:
    """The output of a finished request: its text (``text`` when a stop string cut it), token
    counts and finish reason (with the tool calls parsed out when tools were offered)."""
    tokens = answer.tokens
    usage = Usage(
        prompt_tokens=answer.prompt_tokens,
        completion_tokens=len(tokens),
        total_tokens=answer.prompt_tokens + len(tokens),
    )
    if text is None:
        text = tokenizer.decode(tokens, skip_special_tokens=True)
    reason: FinishReason = "length" if answer.finished == "length" else "stop"
    output = GuardedOutput(text, tokens, decision, usage, reason)
    return with_tool_calls(output, tools, fmt) if tools else output
