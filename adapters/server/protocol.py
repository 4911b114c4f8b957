"""What the server's endpoints share: sampling fields, the endpoint contract the app serves
(:class:`Endpoint`, :class:`Streamer`), and OpenAI's error and log-probability shapes.

Request bodies are pydantic models of our own: they forbid unknown fields (a parameter the
server cannot honour is a 400 naming it, never silently ignored) and carry vLLM's extensions.
The openai package's request types are TypedDicts with lazily validated iterables, which fit
neither. Response bodies are the openai package's own pydantic models (see each endpoint).
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Sequence
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator

from adapters.remote_images import RemoteImageFetcher
from guardrail import GuardedOutput
from guardrail.backends import Sampling
from guardrail.outputs import TextLogprob
from guardrail.service import Call, Delta
from guardrail.service.service import MAX_CHOICES


class Streamer(Protocol):
    """Turns one streamed answer into server-sent events."""

    def start(self) -> list[str]:
        """Events before the first text."""
        ...

    def delta(self, delta: Delta) -> list[str]:
        """Events for new text of one choice."""
        ...

    def end(self, output: GuardedOutput) -> list[str]:
        """The last events of the answer: what text left out (tool calls, finish reasons,
        the decision record)."""
        ...

    def done(self) -> list[str]:
        """The events that close the stream."""
        ...


class Endpoint(Protocol):
    """A validated request body, as the app serves it."""

    model: str
    stream: bool

    @property
    def requested_tokens(self) -> int | None: ...

    def guard_calls(
        self, app: str, max_tokens: int, answer_by: float, fetcher: RemoteImageFetcher
    ) -> list[Call]:
        """The guard calls of this body (several for a text completion of several prompts)."""
        ...

    def response(self, outputs: Sequence[GuardedOutput], model: str) -> dict[str, Any]:
        """The response body for the calls' outputs (in order)."""
        ...

    def streamer(self, model: str) -> Streamer: ...


class SamplingFields(BaseModel):
    """The sampling parameters every generating endpoint takes, OpenAI's and vLLM's."""

    model_config = ConfigDict(extra="forbid")

    model: str
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    user: str | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[int, float] | None = None  # token id (as text in JSON) -> [-100, 100]
    min_tokens: int | None = Field(default=None, ge=0)  # vLLM's extensions from here
    top_k: int | None = Field(default=None, ge=-1)  # -1, 0: all tokens
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > 4:
            raise ValueError("at most 4 stop sequences")
        return stop

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    def sampling(self, max_tokens: int, logprobs: int | None) -> Sampling:
        """The engine's sampling settings (``temperature`` 0 or unset: greedy, and the
        sampling-only fields are then moot)."""
        temperature = self.temperature or 0.0
        sampled = temperature > 0
        return Sampling(
            max_new_tokens=max_tokens,
            temperature=temperature,
            top_p=self.top_p if self.top_p is not None and sampled else 1.0,
            top_k=self.top_k if self.top_k and self.top_k > 0 and sampled else None,
            min_p=(self.min_p or 0.0) if sampled else 0.0,
            seed=self.seed,
            min_new_tokens=min(self.min_tokens or 0, max_tokens),
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0,
            logit_bias=tuple(sorted((self.logit_bias or {}).items())),
            logprobs=logprobs,
        )


class ChunkStream:
    """The chunk streams of chat and text completions: each choice's text as it becomes final,
    then each choice's last chunk (the record in the last one), usage when asked, ``[DONE]``.
    Subclasses say what a chunk is and how a choice's entries look."""

    kind = ""  # the chunks' ``object``
    prefix = ""  # of the stream's id

    def __init__(self, model: str, include_usage: bool) -> None:
        self.model, self.include_usage = model, include_usage
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"

    def start(self) -> list[str]:
        return []

    def delta(self, delta: Delta) -> list[str]:
        return [self.chunk([self.text_entry(delta)])]

    def end(self, output: GuardedOutput) -> list[str]:
        events = []
        last = len(output.choices) - 1
        for index, choice in enumerate(output.choices):
            extra = {"safety": output.decision.model_dump(mode="json")} if index == last else {}
            events.append(self.chunk([self.last_entry(index, choice)], **extra))
        if self.include_usage:
            events.append(self.chunk([], usage=usage(output)))
        return events

    def done(self) -> list[str]:
        return ["data: [DONE]\n\n"]

    def text_entry(self, delta: Delta) -> dict[str, Any]:
        """A choice's entry carrying new text."""
        raise NotImplementedError

    def last_entry(self, index: int, choice: GuardedOutput) -> dict[str, Any]:
        """A choice's last entry: what text left out, and its finish reason."""
        raise NotImplementedError

    def checked(self, body: dict[str, Any]) -> dict[str, Any]:
        """The chunk as sent (validated where the client's model allows)."""
        return body

    def chunk(self, choices: list[dict[str, Any]], **extra: Any) -> str:
        body = {
            "id": self.id,
            "object": self.kind,
            "created": int(time.time()),
            "model": self.model,
            "choices": choices,
            **extra,
        }
        return sse(self.checked(body))


def logprob_value(logprob: float) -> float:
    """A log-probability JSON can carry (-inf as vLLM writes it)."""
    return logprob if math.isfinite(logprob) else -9999.0


def chat_logprob(entry: TextLogprob) -> dict[str, Any]:
    """One token of a chat choice's ``logprobs.content``."""
    return {
        **_token(entry),
        "top_logprobs": [_token(alternative) for alternative in entry.top],
    }


def _token(entry: TextLogprob) -> dict[str, Any]:
    return {
        "token": entry.token,
        "logprob": logprob_value(entry.logprob),
        "bytes": list(entry.token.encode()),
    }


def usage(output: GuardedOutput) -> dict[str, int]:
    return output.usage.model_dump()


def sse(data: dict[str, Any], event: str | None = None) -> str:
    """One server-sent event (named, as the Responses API names its events)."""
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data)}\n\n"


def error_body(
    message: str, kind: str, code: str | None = None, param: str | None = None, **extra: Any
) -> dict[str, Any]:
    """An OpenAI-style error object (``param``: the request field at fault, if one is)."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}, **extra}
