"""The engine with a shift store: lookup, compute on miss, model isolation, outages."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText

from guardrail import (
    CorruptionSpec,
    GuardConfig,
    GuardedVLM,
    GuardUnavailableError,
    ShiftMismatchError,
)
from guardrail.testing import anchor_prompts, fixture_path
from shift_store import FORMAT_VERSION, LocalShiftStore, ShiftVector, open_store


def test_from_pretrained_with_store_computes_once_then_hits(tiny_path, tmp_path, image):
    store = LocalShiftStore(tmp_path)
    first = GuardedVLM.from_pretrained(str(tiny_path), store=store)
    [entry] = store.list()
    assert entry.meta.model.id == first.fingerprint.id and entry.meta.anchor_name == "bundled-v1"
    assert entry.meta.anchor_size == 32
    second = GuardedVLM.from_pretrained(str(tiny_path), store=store)
    assert len(store.list()) == 1 and entry.version == store.list()[0].version  # not rewritten
    assert torch.equal(second.dataset_shift.vectors, first.dataset_shift.vectors)
    out = second.generate("What is this?", [image], max_new_tokens=2)
    assert out.decision.mode_used == "dataset" and out.decision.fallbacks == []
    assert out.decision.shift_id == first.dataset_shift.checksum[:12]


def test_another_checkpoint_never_gets_this_models_vector(tiny_path, tmp_path):
    store = LocalShiftStore(tmp_path)
    original = GuardedVLM.from_pretrained(str(tiny_path), store=store)
    model = AutoModelForImageTextToText.from_pretrained(tiny_path)
    with torch.no_grad():
        model.get_decoder().layers[2].self_attn.o_proj.weight.add_(1e-3)
    tuned = GuardedVLM.from_model(model, original.processor)
    lookup = tuned.use_store(store, compute_on_miss=False)
    assert lookup.vector is None and tuned.dataset_shift is None
    tuned.use_store(store)
    assert len(store.list()) == 2
    assert not torch.equal(tuned.dataset_shift.vectors, original.dataset_shift.vectors)


def test_redis_outage_falls_back_and_recovers(tiny_path, own_redis, image):
    url = f"{own_redis.url}?namespace=engine&retries=0"
    vlm = GuardedVLM.from_pretrained(str(tiny_path), store=url)
    shift = vlm.dataset_shift
    source = vlm.shifts.source
    source.revalidate_s = source.retry_after_s = 0.0  # check the store on every call
    own_redis.kill()
    out = vlm.generate("What is this?", [image], max_new_tokens=2)
    assert out.decision.mode_used == "dataset" and out.decision.shift_id == shift.checksum[:12]
    assert "unreachable" in out.decision.fallbacks[0] and "cached" in out.decision.fallbacks[0]

    cold = GuardedVLM.from_pretrained(str(tiny_path), store=url)  # starts during the outage
    out = cold.generate("What is this?", [image], max_new_tokens=2)
    assert out.decision.mode_used == "sample" and out.decision.guarded
    assert any("unreachable" in f for f in out.decision.fallbacks)
    strict = cold.with_config(GuardConfig(mode="dataset"))
    with pytest.raises(GuardUnavailableError) as info:
        strict.generate("What is this?", [image], max_new_tokens=2)
    assert any("unreachable" in f for f in info.value.decision.fallbacks)

    own_redis.start()
    open_store(url).put(vlm.shifts.source.key, shift)  # e.g. recalibrated by another replica
    cold.shifts.source.revalidate_s = cold.shifts.source.retry_after_s = 0.0
    out = cold.generate("What is this?", [image], max_new_tokens=2)
    assert out.decision.mode_used == "dataset" and out.decision.fallbacks == []


def test_a_view_with_another_corruption_never_applies_the_blank_shift(tiny_path, tmp_path, image):
    """with_config once kept the shift source of the old corruption: a noise view applied the
    blank dataset shift as if it were its own."""
    vlm = GuardedVLM.from_pretrained(str(tiny_path), store=LocalShiftStore(tmp_path))
    blank = vlm.dataset_shift
    assert blank is not None and blank.meta.corruption == "blank"
    noisy = vlm.with_config(GuardConfig(corruption=CorruptionSpec(kind="noise", seed=3)))
    assert noisy.dataset_shift is None
    out = noisy.generate("What is this?", [image], max_new_tokens=2)
    assert out.decision.mode_used == "sample" and out.decision.shift_id is None
    assert "no dataset-level shift" in out.decision.fallbacks[0]
    assert "noise-seed3" in noisy.shifts.key_name and "blank" not in noisy.shifts.key_name
    same = vlm.with_config(GuardConfig(alpha=0.5))  # same corruption: the shift is shared
    assert same.generate("What is this?", [image], max_new_tokens=2).decision.mode_used == "dataset"
    fixed = vlm.with_config(GuardConfig())
    fixed.set_dataset_shift(blank)
    assert fixed.with_config(GuardConfig(corruption={"kind": "noise"})).dataset_shift is None


def test_shift_checks_cover_corruption_position_and_format(tiny_vlm):
    shift = tiny_vlm.compute_sample_shift("What is this?")
    for update, message in (
        ({"corruption": "noise-seed0"}, "corruption"),
        ({"position": "mean-of-prompt"}, "measured at"),
        ({"format_version": FORMAT_VERSION + 1}, "format version"),
    ):
        wrong = type(shift)(vectors=shift.vectors, meta=shift.meta.model_copy(update=update))
        with pytest.raises(ShiftMismatchError, match=message):
            tiny_vlm.check_shift(wrong)


def _poisoned(shift, foreign):
    def like(vectors, decode):
        return ShiftVector(
            vectors=vectors,
            meta=shift.meta,
            decode_vectors=decode,
            anchor_mean=shift.anchor_mean,
            anchor_std=shift.anchor_std,
        )

    def edited(**update):  # a writer without the key edits what the guard reads besides Δ
        return ShiftVector(
            vectors=shift.vectors,
            meta=shift.meta.model_copy(update=update.pop("meta", {})),
            **{
                "decode_vectors": shift.decode_vectors,
                "anchor_mean": shift.anchor_mean,
                "anchor_std": shift.anchor_std,
                **update,
            },
        )

    v, d = shift.vectors, shift.decode_vectors
    return {
        "decode vectors dropped": edited(decode_vectors=None),
        "anchor spread times 100": edited(anchor_std=shift.anchor_std * 100),
        "anchor threshold 1e6": edited(meta={"anchor_distance_threshold": 1e6}),
        "negated": like(-v, -d),
        "times 100": like(v * 100, d * 100),
        "zeroed": like(v * 0, d * 0),
        "filled with 1e30": like(torch.full_like(v, 1e30), torch.full_like(d, 1e30)),
        "another model's, relabelled": like(foreign.vectors, foreign.decode_vectors),
    }


def test_poisoned_vectors_are_refused_and_the_call_runs_at_sample_level(tiny_path, tmp_path, image):
    store = LocalShiftStore(tmp_path)
    vlm = GuardedVLM.from_pretrained(str(tiny_path), store=store)
    genuine = vlm.dataset_shift
    out = vlm.generate("What is this?", [image], max_new_tokens=2)
    assert out.decision.mode_used == "dataset" and out.decision.shift_verified is False
    other = GuardedVLM.from_pretrained(str(fixture_path("tiny-llava_next")))
    foreign = other.compute_dataset_shift(anchor_prompts(), progress=False, activate=False)
    key = vlm.shifts.source.key
    for name, poisoned in _poisoned(genuine, foreign).items():
        store.put(key, poisoned)
        fresh = GuardedVLM.from_pretrained(str(tiny_path))
        fresh.use_store(store, compute_on_miss=False)
        out = fresh.generate("What is this?", [image], max_new_tokens=2)
        assert out.decision.mode_used == "sample", name
        assert "implausible" in out.decision.fallbacks[0], name
        strict = fresh.with_config(GuardConfig(mode="dataset"))
        with pytest.raises(GuardUnavailableError, match="no dataset-level shift"):
            strict.generate("What is this?", [image], max_new_tokens=2)
    store.put(key, genuine)  # the genuine vector back: accepted again
    fresh = GuardedVLM.from_pretrained(str(tiny_path))
    assert fresh.use_store(store, compute_on_miss=False).vector is not None


def test_a_pinned_calibration_refuses_every_other_one(tiny_path, tmp_path, image):
    store = LocalShiftStore(tmp_path)
    vlm = GuardedVLM.from_pretrained(str(tiny_path), store=store)
    pinned = vlm.dataset_shift.meta.calibration_id
    strict = GuardedVLM.from_pretrained(
        str(tiny_path), config=GuardConfig(shift_calibration_id=pinned), store=store
    )
    assert strict.generate("What?", [image], max_new_tokens=2).decision.mode_used == "dataset"
    recalibrated = vlm.compute_dataset_shift(anchor_prompts(), progress=False, activate=False)
    store.put(vlm.shifts.source.key, recalibrated)
    strict.shifts.source.invalidate()
    out = strict.generate("What?", [image], max_new_tokens=2)
    assert out.decision.mode_used == "sample"
    assert f"pinned to {pinned}" in out.decision.fallbacks[0]


def test_a_signed_store_records_verified_vectors(tiny_path, tmp_path, image, monkeypatch):
    monkeypatch.setenv("CMRM_TEST_SIGNING_KEY", "deployment secret")
    url = f"file://{tmp_path}?key_env=CMRM_TEST_SIGNING_KEY"
    vlm = GuardedVLM.from_pretrained(str(tiny_path), store=url)
    out = vlm.generate("What is this?", [image], max_new_tokens=2)
    assert out.decision.mode_used == "dataset" and out.decision.shift_verified is True
    unsigned = LocalShiftStore(tmp_path)  # a writer without the key
    unsigned.put(vlm.shifts.source.key, vlm.dataset_shift)
    fresh = GuardedVLM.from_pretrained(str(tiny_path))
    lookup = fresh.use_store(open_store(url), compute_on_miss=False)
    assert lookup.vector is None and "unsigned" in lookup.note


def test_a_damaged_store_entry_never_stops_the_application(tiny_path, namespace, image):
    url = f"redis://127.0.0.1:6379/0?namespace={namespace}"
    first = GuardedVLM.from_pretrained(str(tiny_path), store=url)
    store = open_store(url)
    store.client.hset(store.redis_key(first.shifts.source.key), "sha256", b"\xff\xfe")
    again = GuardedVLM.from_pretrained(str(tiny_path), store=url)  # recomputes and rewrites
    out = again.generate("What is this?", [image], max_new_tokens=2)
    assert out.decision.mode_used == "dataset" and out.decision.fallbacks == []
