"""Model runtimes the engine runs on: the request-level :class:`Backend` protocol, its
engine-neutral request types, and the transformers implementation."""

from guardrail.backends.base import (
    Backend,
    BackendRequest,
    BatchSession,
    CapturingBackend,
    Correction,
    CorrectionShape,
    Inputs,
    MeasuringBackend,
    Processor,
    Sampling,
    StepEvent,
    TokenLogprob,
)
from guardrail.backends.sessions import Answer, run_to_completion
from guardrail.backends.transformers import TransformersBackend

__all__ = [
    "Answer",
    "Backend",
    "BackendRequest",
    "BatchSession",
    "CapturingBackend",
    "Correction",
    "CorrectionShape",
    "Inputs",
    "MeasuringBackend",
    "Processor",
    "Sampling",
    "StepEvent",
    "TokenLogprob",
    "TransformersBackend",
    "run_to_completion",
]
