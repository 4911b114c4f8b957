"""Typed errors raised by the engine. All derive from :class:`GuardrailError`."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from guardrail.decision import GuardDecision


class GuardrailError(Exception):
    """Base class of every error this package raises on purpose.

    ``decision`` holds the safety decision record of the refused call, when one was made.
    """

    decision: GuardDecision | None = None


class InvalidInputError(GuardrailError, ValueError):
    """The request itself is malformed (bad prompt, images that do not fit the prompt)."""


class InvalidImageError(InvalidInputError):
    """An image could not be read: corrupt, truncated, not an image, or absurdly large."""


class MissingImagePlaceholderError(InvalidInputError):
    """Images were given but the prompt has fewer image placeholders than images."""


class DecoderNotFoundError(GuardrailError, TypeError):
    """The model exposes no decoder layers that the guard could edit."""


class UnknownModelFamilyError(GuardrailError, TypeError):
    """No model family describes this model, or its family lacks a fact the guard needs."""


class ShiftMismatchError(GuardrailError, ValueError):
    """A shift vector does not fit: another model, shape, corruption, position or format."""


class GuardUnavailableError(GuardrailError, RuntimeError):
    """The guard could not be applied and the policy is to fail closed.

    ``decision`` is the safety decision record of the refused call.
    """

    def __init__(self, message: str, decision: GuardDecision | None = None) -> None:
        super().__init__(message)
        self.decision = decision


class CallCancelledError(GuardrailError):
    """The call was cancelled (its client went away, or it was stopped) before it finished."""


class OverloadedError(GuardrailError, RuntimeError):
    """An app has as many calls running as it may; retry later."""
