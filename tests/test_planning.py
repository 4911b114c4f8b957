"""The planner is pure: a request, a config and a shift lookup in, a frozen plan out."""

from __future__ import annotations

import dataclasses

import pytest

from guardrail import GuardConfig, GuardRequest, plan_row
from guardrail.planning import Outcome, decision_record
from shift_store import Lookup
from tests.helpers import make_vector

SHIFT = make_vector(layers=4, hidden=64)
LAYERS = (3,)
DEFAULT = GuardConfig()
FOUND = Lookup(SHIFT, "v1")


def _plan(
    request: GuardRequest, config: GuardConfig = DEFAULT, *, multimodal=True, found: Lookup = FOUND
):
    calls = []

    def lookup() -> Lookup:
        calls.append(1)
        return found

    plan = plan_row(request, config, lookup, multimodal=multimodal, layers=LAYERS, shift_key="key")
    return plan, len(calls)


def test_text_only_passes_through_without_a_lookup():
    plan, lookups = _plan(GuardRequest("hi"), multimodal=False)
    assert (plan.mode, plan.guarded, lookups) == ("text-only", False, 0)


def test_alpha_zero_or_mode_off_is_off():
    for request in (GuardRequest("x", alpha=0.0), GuardRequest("x", mode="off")):
        plan, lookups = _plan(request)
        assert plan.mode == "off" and not plan.guarded and lookups == 0


def test_dataset_shift_from_the_lookup_with_its_key_and_version():
    plan, lookups = _plan(GuardRequest("x", alpha=0.5))
    assert (plan.mode, plan.alpha, plan.shift, lookups) == ("dataset", 0.5, SHIFT, 1)
    assert (plan.shift_key, plan.shift_version, plan.fallbacks) == ("key", "v1", ())


def test_untrusted_input_gets_sample_level_without_a_lookup():
    plan, lookups = _plan(GuardRequest("x", trusted=False))
    assert plan.mode == "sample" and lookups == 0 and plan.mode_requested == "auto"


def test_tools_make_auto_sample_level_unless_configured_otherwise():
    tools = [{"type": "function", "function": {"name": "add", "parameters": {}}}]
    plan, lookups = _plan(GuardRequest("x", tools=tools))
    assert (plan.mode, lookups) == ("sample", 0)
    assert plan.fallbacks == ("tools offered: sample level (sample_level_with_tools)",)
    plan, lookups = _plan(GuardRequest("x", tools=tools, mode="dataset"))
    assert (plan.mode, lookups) == ("dataset", 1)  # an explicit mode is kept
    config = GuardConfig(sample_level_with_tools=False)
    plan, lookups = _plan(GuardRequest("x", tools=tools), config)
    assert (plan.mode, lookups) == ("dataset", 1)


def test_auto_without_a_shift_falls_back_to_sample_and_says_why():
    plan, _ = _plan(GuardRequest("x"), found=Lookup(None, note="store unreachable (down)"))
    assert plan.mode == "sample"
    assert plan.fallbacks == (
        "store unreachable (down)",
        "no dataset-level shift available: sample level",
    )


def test_dataset_without_a_shift_fails_closed_or_answers_unguarded_by_configuration():
    plan, _ = _plan(GuardRequest("x", mode="dataset"), found=Lookup(None))
    assert plan.mode == "unguarded" and plan.fail_closed and "failed closed" in plan.reason
    lenient = GuardConfig(on_unavailable="unguarded")
    plan, _ = _plan(GuardRequest("x", mode="dataset"), lenient, found=Lookup(None))
    assert plan.mode == "unguarded" and not plan.fail_closed
    assert "answered unguarded by configuration" in plan.reason


def test_plans_are_frozen_and_the_decision_is_built_from_plan_and_outcome():
    plan, _ = _plan(GuardRequest("x", app="bot", trusted=True, trust_reason="inline"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.mode = "off"  # type: ignore[misc]
    decision = decision_record(
        plan,
        GuardRequest("x", app="bot", trusted=True, trust_reason="inline"),
        GuardConfig(),
        model_id="m",
        outcome=Outcome(3, 1.25),
    )
    assert (decision.app, decision.trusted, decision.mode_used, decision.guarded) == (
        "bot",
        True,
        "dataset",
        True,
    )
    assert (decision.batch_rows, decision.added_latency_ms, decision.layers) == (3, 1.25, [3])
    assert decision.shift_id == SHIFT.checksum[:12] and decision.shift_key == "key"
    assert decision.shift_norm == pytest.approx(float(SHIFT.vectors[3].norm()))
    assert decision.fallbacks == ["shift has no decode vectors: prompt only"]
