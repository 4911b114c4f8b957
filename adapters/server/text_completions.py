"""``POST /v1/completions``: raw text in (no chat template), ``Completion`` out, as the
openai package's model defines it. Text-only, so the guard passes it through untouched (its
record says so); images have no place in this API."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from openai.types import Completion
from pydantic import Field, field_validator

from adapters.remote_images import RemoteImageFetcher
from adapters.server.protocol import ChunkStream, SamplingFields, logprob_value
from guardrail import GuardedOutput, GuardRequest
from guardrail.errors import InvalidInputError
from guardrail.outputs import TextLogprob
from guardrail.service import Call, Delta

MAX_PROMPTS = 16


class CompletionRequest(SamplingFields):
    """The body of ``POST /v1/completions``. ``prompt`` is text, or a list of texts answered
    as one batch (not streamed); ``echo``, ``suffix`` and ``best_of`` are refused."""

    prompt: str | list[str] = Field(min_length=1)
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    suffix: None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, prompt: str | list[str]) -> str | list[str]:
        if isinstance(prompt, list) and len(prompt) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts")
        return prompt

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, echo: bool) -> bool:
        if echo:
            raise ValueError("echo is not supported by this server")
        return echo

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, best_of: int | None) -> int | None:
        if best_of not in (None, 1):
            raise ValueError("best_of is not supported by this server (use n)")
        return best_of

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else self.prompt

    @property
    def requested_tokens(self) -> int | None:
        return self.max_tokens

    def guard_calls(
        self, app: str, max_tokens: int, answer_by: float, fetcher: RemoteImageFetcher
    ) -> list[Call]:
        if self.stream and len(self.prompts) > 1:
            raise InvalidInputError("a streamed completion takes one prompt")
        sampling = self.sampling(max_tokens, self.logprobs)
        left = answer_by - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request's deadline passed before it started")
        return [
            Call(app, GuardRequest(p, template=False), sampling, (), None, self.stops, left, self.n)
            for p in self.prompts
        ]

    def response(self, outputs: Sequence[GuardedOutput], model: str) -> dict[str, Any]:
        """A ``text_completion``: choice ``i * n + j`` is prompt ``i``'s ``j``-th; ``safety``
        holds the decision record (a list of them, one per prompt, for several prompts)."""
        records = [output.decision.model_dump(mode="json") for output in outputs]
        choices = [
            _choice(i * self.n + j, choice)
            for i, output in enumerate(outputs)
            for j, choice in enumerate(output.choices)
        ]
        counts = [output.usage for output in outputs]
        prompt = sum(u.prompt_tokens for u in counts)
        completion = sum(u.completion_tokens for u in counts)
        body = {
            "id": f"cmpl-{records[0]['call_id']}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            },
            "safety": records[0] if len(records) == 1 else records,
        }
        return Completion.model_validate(body).model_dump(
            mode="json", exclude_unset=True, by_alias=True
        )

    def streamer(self, model: str) -> CompletionStream:
        return CompletionStream(model, self.include_usage)


class CompletionStream(ChunkStream):
    """``text_completion`` chunks; a choice's last chunk carries its finish reason and
    log-probabilities. Not validated: openai's ``Completion`` (which clients parse chunks into)
    has no ``finish_reason`` None, which every chunk before the last carries (as vLLM's do)."""

    kind, prefix = "text_completion", "cmpl"

    def text_entry(self, delta: Delta) -> dict[str, Any]:
        return {"index": delta.choice, "text": delta.text, "finish_reason": None}

    def last_entry(self, index: int, choice: GuardedOutput) -> dict[str, Any]:
        return {**_choice(index, choice), "text": ""}


def _choice(index: int, output: GuardedOutput) -> dict[str, Any]:
    return {
        "index": index,
        "text": output.text,
        "finish_reason": output.finish_reason,
        "logprobs": None if output.logprobs is None else _logprobs(output.logprobs),
    }


def _logprobs(entries: Sequence[TextLogprob]) -> dict[str, Any]:
    """The legacy shape: parallel lists, and each position's alternatives as a mapping."""
    offsets, at = [], 0
    for entry in entries:
        offsets.append(at)
        at += len(entry.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [logprob_value(e.logprob) for e in entries],
        "top_logprobs": [_by_text(e.top) for e in entries],
        "text_offset": offsets,
    }


def _by_text(alternatives: Sequence[TextLogprob]) -> dict[str, float]:
    """Alternatives keyed by their text; of tokens with one text, the most likely."""
    found: dict[str, float] = {}
    for entry in alternatives:
        found.setdefault(entry.token, logprob_value(entry.logprob))
    return found
