"""What a call returns: the answer text and tokens, token counts and the decision record."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from pydantic import BaseModel

from guardrail.backends.base import TokenLogprob
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
class TextLogprob:
    """An answer token's log-probability, with its text, and the most likely alternatives at
    its position (most likely first)."""

    token: str
    token_id: int
    logprob: float
    top: tuple[TextLogprob, ...] = ()


def text_logprob(entry: TokenLogprob, tokenizer: Any) -> TextLogprob:
    """``entry`` with each token's text."""
    top = tuple(TextLogprob(tokenizer.decode([t]), t, p) for t, p in entry.top)
    return TextLogprob(tokenizer.decode([entry.token]), entry.token, entry.logprob, top)


@dataclass(frozen=True)
class GuardedOutput:
    """The answer to one request, with the guard's decision record. ``text`` is the whole
    answer; when tools were offered, ``content`` is its text outside ``tool_calls``.
    ``logprobs`` holds one entry per answer token when the sampling asked for them. A call with
    ``n > 1`` answers with this first choice and its ``alternatives`` (one decision record for
    all; ``usage`` then counts the prompt once and every choice's tokens)."""

    text: str
    token_ids: list[int]
    decision: GuardDecision
    usage: Usage
    finish_reason: FinishReason = "stop"  # length: ended at max_new_tokens
    tool_calls: tuple[ToolCall, ...] = ()
    invalid_tool_calls: tuple[InvalidToolCall, ...] = ()
    content: str | None = None
    logprobs: tuple[TextLogprob, ...] | None = None
    alternatives: tuple[GuardedOutput, ...] = ()

    @property
    def choices(self) -> tuple[GuardedOutput, ...]:
        """Every choice, this one first."""
        return (self, *self.alternatives)

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
    logprobs: bool = False,
) -> GuardedOutput:
    """The output of a finished request: its text (``text`` when a stop string cut it), token
    counts and finish reason (with the tool calls parsed out when tools were offered), and its
    tokens' log-probabilities when ``logprobs``."""
    tokens = answer.tokens
    usage = Usage(
        prompt_tokens=answer.prompt_tokens,
        completion_tokens=len(tokens),
        total_tokens=answer.prompt_tokens + len(tokens),
    )
    if text is None:
        text = tokenizer.decode(tokens, skip_special_tokens=True)
    reason: FinishReason = "length" if answer.finished == "length" else "stop"
    kept = None
    if logprobs:
        kept = tuple(text_logprob(entry, tokenizer) for entry in answer.logprobs[: len(tokens)])
    output = GuardedOutput(text, tokens, decision, usage, reason, logprobs=kept)
    return with_tool_calls(output, tools, fmt) if tools else output


def with_alternatives(first: GuardedOutput, others: Sequence[GuardedOutput]) -> GuardedOutput:
    """One call's choices as one output (see :class:`GuardedOutput`)."""
    completion = sum(o.usage.completion_tokens for o in (first, *others))
    prompt = first.usage.prompt_tokens
    usage = Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )
    return replace(first, usage=usage, alternatives=tuple(others))
