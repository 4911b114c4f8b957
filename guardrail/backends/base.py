"""The backend protocol: what the engine needs from a model runtime.

Generation is request-level, written for a runtime that owns its scheduler and KV cache (as
vLLM does): the engine hands a :class:`BatchSession` whole requests, each with an engine-neutral
:class:`Correction` (from the pure planner) and :class:`Sampling` settings, and reads tokens per
request, step by step. How the runtime lays rows out, caches keys and values, or applies the
correction inside its layers is its own business.

Measurement (calibration, plausibility, evaluation) is separate: :class:`MeasuringBackend` runs
one forward pass with a :class:`~guardrail.backends.hooks.LayerPlan` and returns the states.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from transformers import PreTrainedTokenizerBase, ProcessorMixin

from guardrail.backends.hooks import LayerPlan
from guardrail.config import Positions, Stacking
from guardrail.constraints import OutputConstraint
from guardrail.errors import InvalidInputError
from guardrail.families import ModelFamily
from guardrail.requests import Rendering
from guardrail.tool_formats import ToolCallFormat
from shift_store import ModelFingerprint, ShiftVector

Inputs = dict[str, torch.Tensor]
# What loads with a model: a multimodal processor, or a bare tokenizer.
Processor = ProcessorMixin | PreTrainedTokenizerBase
Finish = Literal["stop", "length", "grammar", "aborted"]
MAX_LOGPROBS = 20  # alternatives per token, as OpenAI allows


@dataclass(frozen=True)
class TokenLogprob:
    """One answer token's log-probability, and the ``top`` most likely (token, log-probability)
    pairs at its position, most likely first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Sampling:
    """How one request picks its tokens. ``temperature == 0`` is greedy; ``seed`` makes a
    sampled request reproducible on its own, whatever it shares a batch with.

    As in vLLM and OpenAI, in this order: ``logit_bias`` (token id, bias) pairs are added to the
    logits; ``repetition_penalty`` divides the positive logits (multiplies the negative ones) of
    every token of the prompt and the answer so far; ``frequency_penalty`` subtracts itself
    once per earlier occurrence of a token in the answer, ``presence_penalty`` once for any;
    then temperature, ``min_p`` (tokens under ``min_p`` times the top probability dropped),
    ``top_k`` and ``top_p``. Greedy decoding takes the bias and the penalties too.

    ``logprobs`` (None: none) asks for each answer token's log-probability and that many most
    likely alternatives (0 to 20), read from the request row's logits after the correction and
    before any of the above (vLLM's default, ``raw_logprobs``).
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int | None = None
    seed: int | None = None
    min_new_tokens: int = 0  # stop tokens are not chosen before this many
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: int | None = None

    def __post_init__(self) -> None:
        """Refuse values no runtime can honour (a typed error, whichever front end sent them)."""
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.min_new_tokens < 0:
            problems.append(f"min_new_tokens must be at least 0, got {self.min_new_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            problems.append(f"temperature must be finite and at least 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            problems.append(f"top_k must be at least 1, got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            problems.append(f"seed must be in [0, 2**63), got {self.seed}")
        if not 0 <= self.min_p <= 1:
            problems.append(f"min_p must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                problems.append(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not (math.isfinite(self.repetition_penalty) and 0 < self.repetition_penalty <= 10):
            problems.append(f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}")
        if any(token < 0 or not -100 <= bias <= 100 for token, bias in self.logit_bias):
            problems.append("logit_bias takes token ids >= 0 and biases in [-100, 100]")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            problems.append(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if problems:
            raise InvalidInputError("; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    @property
    def penalized(self) -> bool:
        """Whether the logits are changed before temperature (bias or a penalty)."""
        return bool(
            self.logit_bias
            or self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1.0
        )


@dataclass(frozen=True)
class CorrectionShape:
    """What rows must agree on to share a batch: the edited layers, the edited positions, how
    several layers stack, and whether reference rows stop after the deepest edited layer."""

    layers: tuple[int, ...]
    positions: Positions
    stacking: Stacking
    trim_references: bool = True


@dataclass(frozen=True)
class Correction:
    """CMRM for one request, engine-neutral: subtract ``alpha·Δ`` at ``shape.layers``, with
    ``Δ`` from ``shift`` (dataset level) or, when ``references`` is given, the live difference of
    the request's two reference sequences (the corrupted prompt, then the text-only prompt), fed
    the request's own tokens in lockstep (sample level)."""

    shape: CorrectionShape
    alpha: float
    shift: ShiftVector | None = None
    references: tuple[Rendering, Rendering] | None = None


@dataclass(frozen=True)
class BackendRequest:
    """One request as the backend sees it; ``correction`` None runs it untouched.

    Requests of one ``prefill_group`` (the choices of one call with ``n > 1``) have the same
    rendering, correction and constraint: a runtime may prefill them, and their reference
    rows, once and decode each on its own (vLLM shares them through its prefix cache)."""

    id: str
    rendering: Rendering
    sampling: Sampling
    correction: Correction | None = None
    constraint: OutputConstraint | None = None
    prefill_group: str | None = None


@dataclass(frozen=True)
class StepEvent:
    """What one step did for one request: a new ``token`` (None when the step produced none),
    ``finished`` once the request is done, the ``batch`` it ran in, the live ‖Δ‖ at the prompt
    of a sample-level request (on its first event), the ``error`` that ended it, if any, and
    ``notes`` on what the runtime did to it (a recomputation after preemption, say)."""

    request_id: str
    token: int | None
    batch: str
    finished: Finish | None = None
    live_shift_norm: float | None = None
    prompt_tokens: int | None = None  # on the first event: the request's prompt length
    error: BaseException | None = None
    notes: tuple[str, ...] = ()  # on the last event: what the runtime did to it (recomputed)
    logprob: TokenLogprob | None = None  # with ``token``, when its sampling asks for logprobs


class BatchSession(Protocol):
    """A running batch the engine feeds requests into and steps. One thread drives a session;
    requests join it between steps when :meth:`admits` says so, and leave it when finished or
    aborted."""

    def admits(self, request: BackendRequest) -> bool:
        """Whether ``request`` can join at the next step."""
        ...

    def add(self, requests: Sequence[BackendRequest]) -> None:
        """Queue ``requests`` (each admitted) to join at the next step."""
        ...

    def step(self) -> list[StepEvent]:
        """Run one step (a prefill of the joining requests, or one decode step of the running
        ones) and report what it did per request."""
        ...

    def abort(self, request_id: str) -> None:
        """Stop ``request_id`` now (client gone, deadline, stop string); no further events."""
        ...

    @property
    def busy(self) -> bool:
        """Whether any request is queued or running."""
        ...


class Backend(Protocol):
    """A loaded vision-language model the guard can run on."""

    family: ModelFamily
    fingerprint: ModelFingerprint
    num_layers: int
    hidden_size: int
    image_token_id: int
    placeholders: tuple[str, ...]  # image/video placeholder tokens, never allowed in user text
    context_length: int | None  # the longest sequence the model takes, when its config says
    tokenizer: PreTrainedTokenizerBase
    takes_tools: bool  # the chat template renders tools itself
    tool_format: ToolCallFormat  # how the model writes tool calls (its family's format)

    def default_image_size(self) -> tuple[int, int]:
        """(width, height) of the corruption image for a prompt without an image."""
        ...

    def resized_pixels(self, width: int, height: int) -> int:
        """An upper bound on the pixels the processor resizes a ``width x height`` image to."""
        ...

    def open_batch(self) -> BatchSession:
        """A new running batch on this model."""
        ...

    def stop_token_ids(self) -> set[int]:
        """Token ids that end an answer (end of sequence and padding)."""
        ...


class CapturingBackend(Backend, Protocol):
    """A backend that reports hidden states: enough for calibration and the plausibility
    check (the vLLM backend is one)."""

    def capture_states(
        self, renderings: Sequence[Rendering], continuation: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Every layer's residual stream at the last prompt token, and at each token of
        ``continuation`` (``[batch, k]`` ids appended to every prompt):
        ``[num_layers, batch, 1 + k, hidden]`` float32."""
        ...


class MeasuringBackend(CapturingBackend, Protocol):
    """A backend that also runs forward passes with any layer plan, for evaluation."""

    image_layers: tuple[int, ...]  # layers that run only with an image (cross-attention)

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def encode(
        self, renderings: Sequence[Rendering], continuation: torch.Tensor | None = None
    ) -> Inputs:
        """Model inputs for ``renderings``, left-padded, with ``continuation`` ids
        (``[batch, k]``) appended to every row when given."""
        ...

    def forward(
        self, inputs: Inputs, plan: LayerPlan | None, *, use_cache: bool = True
    ) -> torch.Tensor:
        """One forward pass with ``plan`` applied: last-position logits ``[batch, vocab]``."""
        ...

    def first_logits(
        self, requests: Sequence[BackendRequest], extra: LayerPlan | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The guarded logits of each request's first answer token, as its prefill computes
        them (``extra`` sees the pass too), and the live ‖Δ‖ of sample-level requests."""
        ...
