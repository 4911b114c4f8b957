"""What a call returns: the answer text and tokens, token counts and the decision record."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel

from guardrail.backends import Inputs
from guardrail.decision import GuardDecision


class Usage(BaseModel):
    """Token counts of one request."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@dataclass(frozen=True)
class GuardedOutput:
    """The answer to one request, with the guard's decision record."""

    text: str
    token_ids: list[int]
    decision: GuardDecision
    usage: Usage
    finish_reason: Literal["stop", "length"] = "stop"  # length: ended at max_new_tokens


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
