"""Every known model family: a tiny random model built from its transformers config, saved and
reloaded through ``from_pretrained``, must keep the engine's exact invariants."""

from __future__ import annotations

import base64
import io
from types import SimpleNamespace

import pytest
import torch
from langchain_core.messages import HumanMessage
from PIL import Image

from adapters.langchain import ChatGuardedVLM
from guardrail import (
    FAMILIES,
    GuardConfig,
    GuardedVLM,
    GuardRequest,
    ModelFamily,
    UnknownModelFamilyError,
)
from guardrail.errors import InvalidImageError
from guardrail.families import family_for, family_named
from guardrail.images import corruption_image
from guardrail.requests import corrupted, render_request
from guardrail.testing import TINY_FAMILIES, fixture_path, synthetic_image

PROMPT = "How do I get into a locked house?"
ANCHORS = ["What is in this picture?", "How do I open a locked door?", "Tell me about cats."]


@pytest.fixture(scope="module", params=TINY_FAMILIES)
def family_vlm(request) -> GuardedVLM:
    return GuardedVLM.from_pretrained(str(fixture_path(f"tiny-{request.param}")))


def _raw_logits(vlm: GuardedVLM, request: GuardRequest) -> torch.Tensor:
    inputs = vlm.encode([render_request(request)])
    with torch.no_grad():
        return vlm.model(**inputs, logits_to_keep=1).logits[:, -1].float()


def test_every_known_family_has_a_tiny_builder():
    """The invariants below run on every family: a family without a builder is untested."""
    assert sorted(f.name for f in FAMILIES) == sorted(TINY_FAMILIES)


def test_family_is_found_from_the_config(family_vlm, request):
    name = request.node.callspec.params["family_vlm"]
    assert family_vlm.family.name == name
    assert family_vlm.num_layers == 4 and family_vlm.hidden_size == 64


def test_text_only_calls_are_bit_identical_to_the_plain_model(family_vlm):
    text = GuardRequest(PROMPT)
    logits, decisions = family_vlm.next_token_logits([text])
    assert torch.equal(logits, _raw_logits(family_vlm, text))
    assert decisions[0].mode_used == "text-only" and not decisions[0].guarded
    inputs = family_vlm.encode([render_request(text)])
    with torch.no_grad():
        plain = family_vlm.model.generate(
            **inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False
        )
    out = family_vlm.generate(PROMPT, max_new_tokens=6, min_new_tokens=6)
    assert out.token_ids == plain[0, inputs["input_ids"].shape[1] :].tolist()[: len(out.token_ids)]


def test_a_text_only_request_batched_with_an_image_request_is_answered_as_alone(family_vlm):
    """Mllama runs its cross-attention layers for every row once one row has an image; the
    guard passes image-free rows through them, so they match a text-only call."""
    alone, _ = family_vlm.next_token_logits([GuardRequest(PROMPT)])
    image = GuardRequest("Describe it.", [synthetic_image(7, (48, 40))], mode="off")
    mixed, decisions = family_vlm.next_token_logits([GuardRequest(PROMPT), image])
    assert decisions[0].mode_used == "text-only"
    assert (mixed[0] - alone[0]).abs().max() < 1e-5


def test_alpha_zero_is_bit_identical_to_the_unguarded_model(family_vlm):
    request = GuardRequest(PROMPT, [synthetic_image(4, (48, 40))], alpha=0.0, mode="sample")
    logits, decisions = family_vlm.next_token_logits([request])
    assert torch.equal(logits, _raw_logits(family_vlm, request))
    assert decisions[0].mode_used == "off"


def test_sample_level_with_the_corruption_image_recovers_text_only_logits(family_vlm):
    vlm = family_vlm.with_config(GuardConfig(layers=(-1,), alpha=1.0, mode="sample"))
    blank = corruption_image(vlm.config.corruption, (48, 40))
    text, _ = vlm.next_token_logits([GuardRequest(PROMPT)])
    guarded, decisions = vlm.next_token_logits([GuardRequest(PROMPT, [blank])])
    unguarded, _ = vlm.next_token_logits([GuardRequest(PROMPT, [blank], mode="off")])
    assert decisions[0].mode_used == "sample" and decisions[0].guarded
    assert (guarded - text).abs().max() < 1e-3
    assert (unguarded - text).abs().max() > 1e-3  # the image really moved the logits


def test_dataset_and_sample_level_run_end_to_end(family_vlm):
    vlm = family_vlm.with_config(GuardConfig())
    shift = vlm.compute_dataset_shift(ANCHORS, batch_size=2, progress=False)
    assert shift.meta.model.id == vlm.fingerprint.id and float(shift.norms.min()) > 0
    image = synthetic_image(5, (48, 40))
    for mode in ("dataset", "sample"):
        out = vlm.generate("Describe it.", [image], mode=mode, max_new_tokens=4)
        assert out.decision.mode_used == mode and out.decision.guarded
        assert out.decision.shift_norm is not None and out.decision.shift_norm > 0
        assert out.usage.completion_tokens == len(out.token_ids)


def test_langchain_adapter_guards_every_family(family_vlm, tmp_path):
    path = family_vlm.model.config.name_or_path
    chat = ChatGuardedVLM.from_model_id(
        model=path, app="families", store=f"file://{tmp_path}", max_tokens=3
    )
    buffer = io.BytesIO()
    synthetic_image(6, (48, 40)).save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    message = HumanMessage(
        content=[
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": "What is this?"},
        ]
    )
    for trust, mode in (("trusted", "dataset"), ("untrusted", "sample")):
        safety = chat.invoke([message], trust=trust).response_metadata["safety"]
        assert safety["mode_used"] == mode and safety["guarded"]


def test_qwen2_vl_corruption_image_for_a_text_prompt_has_the_size_of_a_real_image():
    """Qwen2-VL's processor size is a pixel-count range, not a side length: the corruption
    image of a text-only anchor must give as many tokens as a 336 px image (144), not 3136 px."""
    vlm = GuardedVLM.from_pretrained(str(fixture_path("tiny-qwen2_vl")))
    assert vlm.backend.default_image_size() == (336, 336)
    rendering = corrupted(
        render_request(GuardRequest(PROMPT)),
        vlm.config.corruption,
        vlm.backend.default_image_size(),
    )
    inputs = vlm.encode([rendering])
    assert int((inputs["input_ids"] == vlm.backend.image_token_id).sum()) == 144


def test_unknown_family_is_a_typed_error_naming_what_is_missing():
    with pytest.raises(UnknownModelFamilyError, match="model_type 'mystery'") as info:
        family_for(SimpleNamespace(model_type="mystery"))
    assert "layers_path" in str(info.value) and "image_token_attributes" in str(info.value)


def test_a_user_family_overrides_the_known_one(tiny_path):
    custom = ModelFamily(
        "my-llava",
        ("llava",),
        layers_path="model.language_model.layers",
        image_token_attributes=("image_token_id",),
    )
    vlm = GuardedVLM.from_pretrained(str(tiny_path), family=custom)
    assert vlm.family is custom and vlm.num_layers == 4
    missing = ModelFamily("broken", ("llava",), image_token_attributes=("no_such_id",))
    with pytest.raises(UnknownModelFamilyError, match="no_such_id"):
        GuardedVLM.from_pretrained(str(tiny_path), family=missing)


@pytest.mark.parametrize(
    "family, image_processor, size, expected",
    [
        # LLaVA-1.5's CLIP: the short side goes up to 336, so a 2000x1 image becomes 672000x336
        ("llava", {"size": {"shortest_edge": 336}}, (2000, 1), 336 * 336 * 2000),
        ("llava", {"size": {"shortest_edge": 336}}, (640, 480), 150_528),
        ("gemma3", {"size": {"height": 896, "width": 896}}, (2000, 100), 896 * 896),
        (
            "qwen2_vl",
            {"size": {"shortest_edge": 3136, "longest_edge": 12845056}},
            (2000, 100),
            12845056,
        ),
        ("idefics3", {"size": {"longest_edge": 1456}}, (2000, 100), 1456 * 1456),
    ],
)
def test_the_processors_resize_is_bounded_from_its_settings(
    family, image_processor, size, expected
):
    processor = SimpleNamespace(image_processor=SimpleNamespace(**image_processor))
    assert family_named(family).resized_pixels(processor, *size) == expected


def test_an_image_the_processor_would_blow_up_is_refused_before_it_runs(tiny_vlm):
    """The tiny fixture's processor scales the short side to 32 pixels: a 400x20 image becomes
    640x32 = 20,480 pixels, over a budget of 10,000; 200x20 (10,240) and 100x50 fit 12,000."""
    strict = tiny_vlm.with_config(GuardConfig(max_resized_pixels=12_000))
    with pytest.raises(InvalidImageError, match="resized to 20,480 pixels") as info:
        strict.generate("What?", [Image.new("RGB", (400, 20))], max_new_tokens=1)
    assert info.value.decision.mode_used == "refused"
    assert strict.generate(
        "What?", [Image.new("RGB", (200, 20))], max_new_tokens=1
    ).decision.guarded
