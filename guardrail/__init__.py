"""cmrm-guardrail engine: CMRM (Liu et al. 2024) for local vision-language models."""

from guardrail.config import CorruptionSpec, GuardConfig
from guardrail.decision import GuardDecision
from guardrail.engine import GuardedOutput, GuardedVLM, Usage
from guardrail.errors import (
    DecoderNotFoundError,
    GuardrailError,
    GuardUnavailableError,
    InvalidImageError,
    InvalidInputError,
    MissingImagePlaceholderError,
    ShiftMismatchError,
)
from guardrail.loading import find_decoder_layers
from guardrail.prompts import GuardRequest
from shift_store import ShiftVector

__all__ = [
    "CorruptionSpec",
    "DecoderNotFoundError",
    "GuardConfig",
    "GuardDecision",
    "GuardRequest",
    "GuardUnavailableError",
    "GuardedOutput",
    "GuardedVLM",
    "GuardrailError",
    "InvalidImageError",
    "InvalidInputError",
    "MissingImagePlaceholderError",
    "ShiftMismatchError",
    "ShiftVector",
    "Usage",
    "find_decoder_layers",
]
