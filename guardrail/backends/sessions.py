"""Driving a :class:`~guardrail.backends.base.BatchSession`: what one request has received so
far, and running a set of requests to completion (scripts, calibration, evaluation; the guard
service drives its session itself, step by step)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from guardrail.backends.base import BackendRequest, BatchSession, Finish, StepEvent, TokenLogprob


@dataclass
class Answer:
    """The tokens and facts one request has received from its steps."""

    tokens: list[int] = field(default_factory=list)
    finished: Finish | None = None
    batch: str = ""
    live_shift_norm: float | None = None
    prompt_tokens: int = 0
    error: BaseException | None = None
    notes: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)

    def take(self, event: StepEvent) -> None:
        """Add what one step did for this request."""
        if event.token is not None:
            self.tokens.append(event.token)
        if event.logprob is not None:
            self.logprobs.append(event.logprob)
        self.batch = self.batch or event.batch
        if event.live_shift_norm is not None:
            self.live_shift_norm = event.live_shift_norm
        if event.prompt_tokens is not None:
            self.prompt_tokens = event.prompt_tokens
        self.notes += event.notes
        if event.finished is not None:
            self.finished, self.error = event.finished, event.error


def run_to_completion(
    session: BatchSession, requests: Sequence[BackendRequest]
) -> dict[str, Answer]:
    """Add every request (those the session cannot take yet, as soon as it can) and step until
    all are finished."""
    answers = {r.id: Answer() for r in requests}
    waiting = list(requests)
    while waiting or session.busy:
        admitted = [r for r in waiting if session.admits(r)]
        if admitted:
            waiting = [r for r in waiting if r not in admitted]
            session.add(admitted)
        for event in session.step():
            answers[event.request_id].take(event)
    return answers
