"""From a plan to the backend's request: the engine-neutral correction spec of one call."""

from __future__ import annotations

from collections.abc import Callable

from guardrail.backends.base import BackendRequest, Correction, CorrectionShape, Sampling
from guardrail.config import GuardConfig
from guardrail.planning import RowPlan
from guardrail.requests import GuardRequest, Rendering, corrupted, text_only


def correction_shape(config: GuardConfig, layers: tuple[int, ...]) -> CorrectionShape:
    """What a config's rows must agree on with others to share a batch."""
    return CorrectionShape(layers, config.positions, config.stacking, config.trim_references)


def to_backend_request(
    request_id: str,
    request: GuardRequest,
    rendering: Rendering,
    plan: RowPlan,
    config: GuardConfig,
    sampling: Sampling,
    default_image_size: Callable[[], tuple[int, int]],
) -> BackendRequest:
    """The backend's form of a planned request: dataset level carries its stored shift,
    sample level its two reference renderings (corrupted, then text-only)."""
    correction = None
    if plan.guarded:
        shape = correction_shape(config, plan.layers)
        if plan.mode == "sample":
            references = (
                corrupted(rendering, config.corruption, default_image_size()),
                text_only(rendering),
            )
            correction = Correction(shape, plan.alpha, references=references)
        else:
            correction = Correction(shape, plan.alpha, shift=plan.shift)
    return BackendRequest(request_id, rendering, sampling, correction, request.constraint)
