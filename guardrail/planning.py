"""The planner: how one request is guarded, decided before any model runs (pure), and the
decision record built from that plan and what happened."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from guardrail.config import GuardConfig
from guardrail.decision import GuardDecision, ModeUsed
from guardrail.requests import GuardRequest
from shift_store import Lookup, ShiftVector


@dataclass(frozen=True)
class RowPlan:
    """The guard's plan for one request.

    ``mode`` is what will run: ``dataset`` (``shift`` applied), ``sample`` (reference rows),
    ``off`` (α = 0 or mode off), ``text-only`` (no image: passed through) or ``unguarded`` (the
    guard cannot apply; ``fail_closed`` says the call must then be refused).
    """

    mode_requested: str
    mode: ModeUsed
    alpha: float
    layers: tuple[int, ...]
    reason: str
    fallbacks: tuple[str, ...] = ()
    shift: ShiftVector | None = None
    shift_key: str | None = None
    shift_version: str | None = None
    shift_verified: bool | None = None
    fail_closed: bool = False

    @property
    def guarded(self) -> bool:
        return self.mode in ("dataset", "sample")


def plan_row(
    request: GuardRequest,
    config: GuardConfig,
    lookup: Callable[[], Lookup],
    *,
    multimodal: bool,
    layers: tuple[int, ...],
    shift_key: str | None = None,
) -> RowPlan:
    """Plan ``request`` under ``config``.

    ``lookup`` gives the dataset-level shift (already checked to fit), stored under
    ``shift_key``; it is called only when a multimodal row may use it. ``request.shift`` must
    have been checked by the caller.
    """
    requested = mode = request.mode or config.mode
    alpha = config.alpha if request.alpha is None else float(request.alpha)

    def plan(mode_used: ModeUsed, reason: str, *fallbacks: str) -> RowPlan:
        return RowPlan(requested, mode_used, alpha, layers, reason, tuple(fallbacks))

    if not multimodal:
        return plan("text-only", "no image: passed through")
    if mode == "off" or alpha == 0.0:
        return plan("off", f"mode={mode}, alpha={alpha}")
    notes: list[str] = []
    if request.trusted is False and mode in ("auto", "dataset"):
        mode = "sample"  # untrusted input: a shift measured on this very input
    if request.tools and mode == "auto" and config.sample_level_with_tools:
        mode = "sample"
        notes.append("tools offered: sample level (sample_level_with_tools)")
    if mode in ("dataset", "auto") and request.shift is not None:
        return replace(
            plan("dataset", "dataset-level shift (given by the caller)"), shift=request.shift
        )
    if mode in ("dataset", "auto"):
        found = lookup()
        notes += [found.note] if found.note else []
        if found.vector is not None:
            return replace(
                plan("dataset", "dataset-level shift", *notes),
                shift=found.vector,
                shift_key=shift_key,
                shift_version=found.version,
                shift_verified=found.verified if shift_key is not None else None,
            )
    if mode == "dataset":
        why = "mode=dataset but no dataset-level shift is available"
        closed = config.on_unavailable == "fail_closed"
        outcome = "failed closed" if closed else "answered unguarded by configuration"
        return replace(
            plan("unguarded", f"guard unavailable: {why} ({outcome})", *notes, why),
            fail_closed=closed,
        )
    if mode == "auto":
        notes.append("no dataset-level shift available: sample level")
    return plan("sample", "sample-level shift", *notes)


@dataclass(frozen=True)
class Outcome:
    """What happened when the plan ran: requests in its batch, preparation time, the live shift
    norm of a sample-level row, and the id of the batch it ran in."""

    batch_rows: int = 1
    added_latency_ms: float = 0.0
    live_shift_norm: float | None = None
    batch: str | None = None
    runtime_events: tuple[str, ...] = ()


def decision_record(
    plan: RowPlan,
    request: GuardRequest,
    config: GuardConfig,
    *,
    model_id: str,
    outcome: Outcome = Outcome(),
    call_id: str | None = None,
) -> GuardDecision:
    """The decision record of one request, built once from its plan and the outcome."""
    shift, fallbacks = plan.shift, list(plan.fallbacks)
    if plan.mode == "dataset" and shift is not None and shift.decode_vectors is None:
        fallbacks.append("shift has no decode vectors: prompt only")
    decision = GuardDecision(
        call_id=call_id or uuid.uuid4().hex,
        app=request.app,
        model=model_id,
        trusted=request.trusted,
        trust_reason=request.trust_reason,
        multimodal=plan.mode != "text-only",
        guarded=plan.guarded,
        mode_requested=plan.mode_requested,
        mode_used=plan.mode,
        alpha=plan.alpha,
        layers=list(plan.layers),
        positions=config.positions,
        stacking=config.stacking,
        fallbacks=fallbacks,
        batch_rows=outcome.batch_rows,
        batch=outcome.batch,
        runtime_events=list(outcome.runtime_events),
        reason=plan.reason,
        added_latency_ms=round(outcome.added_latency_ms, 3) if plan.guarded else 0.0,
    )
    if plan.mode == "dataset" and shift is not None:
        decision.shift_id, decision.shift_level = shift.checksum[:12], shift.meta.level
        decision.shift_norm = float(shift.vectors[plan.layers[-1]].norm())
        decision.shift_key, decision.shift_version = plan.shift_key, plan.shift_version
        decision.shift_verified = plan.shift_verified
    elif plan.mode == "sample":
        decision.shift_level, decision.shift_norm = "sample", outcome.live_shift_norm
    return decision


def refusal_record(
    error: Exception, config: GuardConfig, layers: Sequence[int], model_id: str, app: str | None
) -> GuardDecision:
    """The decision record of a call refused as bad input (nothing was generated)."""
    return GuardDecision(
        call_id=uuid.uuid4().hex,
        app=app,
        model=model_id,
        multimodal=True,
        guarded=False,
        mode_requested=config.mode,
        mode_used="refused",
        alpha=config.alpha,
        layers=list(layers),
        positions=config.positions,
        stacking=config.stacking,
        reason=f"input refused: {type(error).__name__}: {error}",
    )
