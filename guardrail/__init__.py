"""cmrm-guardrail engine: CMRM (Liu et al. 2024) for local vision-language models."""

from guardrail.version import __version__  # noqa: I001  (first: other modules read it)
from guardrail.backends import Backend, TransformersBackend
from guardrail.config import CorruptionSpec, GuardConfig
from guardrail.decision import GuardDecision
from guardrail.engine import GuardedVLM
from guardrail.outputs import GuardedOutput, Usage
from guardrail.errors import (
    DecoderNotFoundError,
    GuardrailError,
    GuardUnavailableError,
    InvalidImageError,
    InvalidInputError,
    MissingImagePlaceholderError,
    ShiftMismatchError,
    UnknownModelFamilyError,
)
from guardrail.families import FAMILIES, ModelFamily
from guardrail.planning import RowPlan, plan_row
from guardrail.requests import GuardRequest
from guardrail.shifts import ShiftRequirements
from shift_store import ShiftVector

__all__ = [
    "FAMILIES",
    "Backend",
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
    "ModelFamily",
    "RowPlan",
    "ShiftMismatchError",
    "ShiftRequirements",
    "ShiftVector",
    "TransformersBackend",
    "UnknownModelFamilyError",
    "Usage",
    "__version__",
    "plan_row",
]
