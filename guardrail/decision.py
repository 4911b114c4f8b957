"""Safety decision records: one per request, logged as a JSON line on ``guardrail.decisions``."""

from __future__ import annotations

import logging
from typing import Literal

from pydantic import BaseModel, Field

DECISION_LOGGER = logging.getLogger("guardrail.decisions")

ModeUsed = Literal["dataset", "sample", "off", "text-only", "unguarded", "refused"]


class GuardDecision(BaseModel):
    """What the guard did for one request, and why. Never contains prompt text or image bytes."""

    call_id: str
    app: str | None = None
    model: str = Field(description="model fingerprint id")
    trusted: bool | None = Field(default=None, description="None: no trust policy consulted")
    trust_reason: str | None = None
    multimodal: bool
    guarded: bool = Field(description="True when a correction was applied to this request")
    mode_requested: str
    mode_used: ModeUsed
    alpha: float
    layers: list[int]
    positions: str
    stacking: str
    shift_id: str | None = Field(default=None, description="checksum prefix of the shift used")
    shift_key: str | None = Field(default=None, description="store key of a dataset shift")
    shift_version: str | None = None
    shift_verified: bool | None = Field(
        default=None,
        description="store shift: True when its signature was verified against the deployment "
        "key, False when the store has no key (checksum only); None for other shifts",
    )
    shift_level: Literal["dataset", "sample"] | None = None
    shift_norm: float | None = Field(default=None, description="‖Δ‖ at the last edited layer")
    fallbacks: list[str] = Field(default_factory=list)
    batch_rows: int = Field(
        default=1, description="requests that had joined this call's batch when it finished"
    )
    batch: str | None = Field(
        default=None, description="id of the running batch this call was answered in"
    )
    runtime_events: list[str] = Field(
        default_factory=list,
        description="what the runtime did to this call on the way (a sample-level request "
        "recomputed after its lockstep broke, say)",
    )
    reason: str
    added_latency_ms: float = Field(
        default=0.0,
        description="guard preparation before generation (shift lookup, trust "
        "check, reference-row encoding); the in-pass reference rows' compute is not included",
    )


def log_decision(decision: GuardDecision) -> None:
    """Emit ``decision`` as one JSON line on the ``guardrail.decisions`` logger."""
    level = logging.INFO if decision.guarded or not decision.multimodal else logging.WARNING
    DECISION_LOGGER.log(level, decision.model_dump_json())
