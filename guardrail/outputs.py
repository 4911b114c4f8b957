"""What a call returns: the answer text and tokens, token counts and the decision record."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from pydantic import BaseModel

from guardrail.backends import Inputs
from guardrail.decision import GuardDecision
from guardrail.tools import InvalidToolCall, Tool, ToolCall, parse_tool_calls

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


def with_tool_calls(output: GuardedOutput, tools: Sequence[Tool]) -> GuardedOutput:
    """``output`` with the tool calls in its text parsed out."""
    content, calls, invalid = parse_tool_calls(output.text, tools)
    reason: FinishReason = "tool_calls" if calls else output.finish_reason
    return replace(
        output,
        content=content,
        tool_calls=tuple(calls),
        invalid_tool_calls=tuple(invalid),
        finish_reason=reason,
    )


def answers(
    inputs: Inputs,
    output: torch.Tensor,
    decisions: Sequence[GuardDecision],
    stops: set[int],
    tokenizer: Any,
) -> list[GuardedOutput]:
    """One output per request row of a ``generate`` result (prompt plus new tokens), each cut
    at its first stop token."""
    prompt_length = inputs["input_ids"].shape[1]
    prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
    results = []
    for i, decision in enumerate(decisions):
        tokens = output[i, prompt_length:].tolist()
        end = next((j for j, t in enumerate(tokens) if t in stops), None)
        tokens = tokens[:end]
        usage = Usage(
            prompt_tokens=prompt_tokens[i],
            completion_tokens=len(tokens),
            total_tokens=prompt_tokens[i] + len(tokens),
        )
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        reason: Literal["stop", "length"] = "stop" if end is not None else "length"
        results.append(GuardedOutput(text, tokens, decision, usage, reason))
    return results
