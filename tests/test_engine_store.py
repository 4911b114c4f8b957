"""The engine with a shift store: lookup, compute on miss, model isolation, outages."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText

from guardrail import GuardConfig, GuardedVLM, GuardUnavailableError
from shift_store import LocalShiftStore, open_store


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
    tuned = GuardedVLM(model, original.processor)
    lookup = tuned.use_store(store, compute_on_miss=False)
    assert lookup.vector is None and tuned.dataset_shift is None
    tuned.use_store(store)
    assert len(store.list()) == 2
    assert not torch.equal(tuned.dataset_shift.vectors, original.dataset_shift.vectors)


def test_redis_outage_falls_back_and_recovers(tiny_path, own_redis, image):
    url = f"{own_redis.url}?namespace=engine&retries=0"
    vlm = GuardedVLM.from_pretrained(str(tiny_path), store=url)
    shift = vlm.dataset_shift
    vlm._source.revalidate_s = vlm._source.retry_after_s = 0.0  # check the store on every call
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
    open_store(url).put(vlm._source.key, shift)  # e.g. recalibrated by another replica
    cold._source.revalidate_s = cold._source.retry_after_s = 0.0
    out = cold.generate("What is this?", [image], max_new_tokens=2)
    assert out.decision.mode_used == "dataset" and out.decision.fallbacks == []
