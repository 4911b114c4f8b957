"""Engine behaviour on the tiny fixture: shifts, policies, errors, concurrency, decisions."""

from __future__ import annotations

import io
import json
import logging
import threading
import time

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from guardrail import (
    DecoderNotFoundError,
    GuardConfig,
    GuardedVLM,
    GuardrailError,
    GuardRequest,
    GuardUnavailableError,
    InvalidImageError,
    InvalidInputError,
    MissingImagePlaceholderError,
    ShiftMismatchError,
)
from guardrail.backends import Sampling, TransformersBackend
from guardrail.backends.hooks import CorrectionPlan, Lockstep, RowTrim
from guardrail.backends.penalties import penalize
from guardrail.backends.transformers_batch import prefill_mask, stacked_shifts
from guardrail.images import corruption_image
from guardrail.limits import parse_json
from guardrail.requests import render_request
from guardrail.testing import synthetic_image
from shift_store import ShiftVector

ANCHORS = ["What is in this picture?", "How do I open a locked door?", "Tell me about cats."]


def test_tiny_fixture_loads_through_from_pretrained(tiny_path):
    vlm = GuardedVLM.from_pretrained(str(tiny_path))
    assert (vlm.num_layers, vlm.hidden_size, vlm.family.name) == (4, 64, "llava")


def test_smollm_fixture_saves_again_after_loading(smollm_vlm, tmp_path):
    """Its weights are dequantised: nothing marks it GGUF-quantised, so a model loaded from it
    (and fine-tuned, as the model organism does) saves and reloads with the same weights."""
    from transformers import AutoModelForImageTextToText

    model = smollm_vlm.model
    assert getattr(model.config.text_config, "quantization_config", None) is None
    model.save_pretrained(tmp_path)
    again = AutoModelForImageTextToText.from_pretrained(tmp_path)
    first = next(iter(model.state_dict().items()))
    assert torch.equal(again.state_dict()[first[0]], first[1])


def test_dataset_shift_is_mean_of_sample_shifts(tiny_vlm):
    dataset = tiny_vlm.compute_dataset_shift(
        ANCHORS, batch_size=2, progress=False, activate=False, anchor_name="unit"
    )
    samples = torch.stack([tiny_vlm.compute_sample_shift(p).vectors for p in ANCHORS])
    assert dataset.vectors.shape == (4, 64) and dataset.vectors.dtype == torch.float32
    assert dataset.decode_vectors.shape == (4, 64)
    assert not torch.allclose(dataset.decode_vectors, dataset.vectors)
    torch.testing.assert_close(dataset.vectors, samples.mean(0), rtol=1e-4, atol=1e-4)
    assert dataset.meta.anchor_size == 3 and dataset.meta.anchor_name == "unit"
    assert dataset.meta.level == "dataset" and dataset.meta.corruption == "blank"
    assert float(dataset.norms.min()) > 0


def test_dataset_shift_streams_from_a_generator(tiny_vlm):
    from_list = tiny_vlm.compute_dataset_shift(
        ANCHORS, batch_size=2, progress=False, activate=False
    )
    from_gen = tiny_vlm.compute_dataset_shift(
        (p for p in ANCHORS), batch_size=2, progress=False, activate=False
    )
    torch.testing.assert_close(from_list.vectors, from_gen.vectors)
    with pytest.raises(InvalidInputError, match="empty"):
        tiny_vlm.compute_dataset_shift([], progress=False)


def test_noise_corruption_gives_another_shift(tiny_vlm):
    blank = tiny_vlm.compute_sample_shift(ANCHORS[0])
    noisy = tiny_vlm.with_config(GuardConfig(corruption={"kind": "noise", "seed": 3}))
    noise = noisy.compute_sample_shift(ANCHORS[0])
    assert noise.meta.corruption == "noise-seed3"
    assert not torch.allclose(noise.vectors, blank.vectors)


def test_auto_uses_dataset_shift_when_loaded_and_sample_otherwise(tiny_vlm, image):
    vlm = tiny_vlm.with_config(GuardConfig(mode="auto"))
    vlm.set_dataset_shift(None)
    out = vlm.generate("What is this?", [image], max_new_tokens=3)
    assert out.decision.mode_used == "sample"
    assert out.decision.fallbacks == ["no dataset-level shift available: sample level"]
    shift = vlm.compute_dataset_shift(ANCHORS, progress=False)
    out = vlm.generate("What is this?", [image], max_new_tokens=3)
    assert out.decision.mode_used == "dataset" and out.decision.fallbacks == []
    assert out.decision.shift_id == shift.checksum[:12]
    assert out.decision.shift_norm == pytest.approx(float(shift.norms[-1]), rel=1e-5)


def test_fail_closed_without_dataset_shift(tiny_vlm, image):
    vlm = tiny_vlm.with_config(GuardConfig(mode="dataset"))
    vlm.set_dataset_shift(None)
    with pytest.raises(GuardUnavailableError) as info:
        vlm.generate("What is this?", [image], max_new_tokens=3)
    assert info.value.decision.mode_used == "unguarded" and not info.value.decision.guarded
    assert "failed closed" in info.value.decision.reason
    # text-only calls never need the guard
    assert vlm.generate("Hi", max_new_tokens=2).decision.mode_used == "text-only"


def test_explicit_unguarded_policy_answers_and_says_so(tiny_vlm, image):
    vlm = tiny_vlm.with_config(GuardConfig(mode="dataset", on_unavailable="unguarded"))
    vlm.set_dataset_shift(None)
    out = vlm.generate("What is this?", [image], max_new_tokens=3)
    raw = vlm.generate("What is this?", [image], max_new_tokens=3, mode="off")
    assert out.token_ids == raw.token_ids
    assert out.decision.mode_used == "unguarded" and not out.decision.guarded
    assert "answered unguarded by configuration" in out.decision.reason


def test_decision_is_logged_as_json_without_prompt(tiny_vlm, image, caplog):
    secret = "my secret prompt text"
    with caplog.at_level(logging.INFO, logger="guardrail.decisions"):
        out = tiny_vlm.generate(secret, [image], max_new_tokens=2, mode="sample", alpha=0.7)
    records = [r for r in caplog.records if r.name == "guardrail.decisions"]
    assert len(records) == 1
    logged = json.loads(records[0].getMessage())
    assert logged == json.loads(out.decision.model_dump_json())
    assert logged["alpha"] == 0.7 and logged["mode_used"] == "sample" and logged["guarded"]
    assert logged["model"] == tiny_vlm.fingerprint.id
    assert secret not in records[0].getMessage()


def test_usage_counts_tokens(tiny_vlm, image):
    out = tiny_vlm.generate("What is this?", [image], max_new_tokens=5, mode="off")
    assert out.usage.completion_tokens == len(out.token_ids) <= 5
    assert out.usage.prompt_tokens > 16  # 16 image tokens plus the text
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_positions_policies_build_the_right_prefill_mask(tiny_vlm, image):
    rows = [
        render_request(GuardRequest("What?", [image])),
        render_request(GuardRequest("A much longer text-only prompt here")),
    ]
    inputs = tiny_vlm.encode(rows)
    image_token = tiny_vlm.backend.image_token_id
    is_image = inputs["input_ids"] == image_token
    real = inputs["attention_mask"].bool()
    masks = {p: prefill_mask(p, inputs, image_token) for p in ("all", "text", "last")}
    assert torch.equal(masks["all"], real)
    assert torch.equal(masks["text"], real & ~is_image) and int(is_image.sum()) == 16
    assert masks["last"].sum(1).tolist() == [1, 1] and masks["last"][:, -1].all()


def test_correction_plan_edits_prefill_mask_then_every_decode_token():
    shifts = torch.tensor([[[1.0, 2.0], [0.0, 0.0]]])  # one layer, two rows
    mask = torch.tensor([[False, True, True], [True, True, True]])
    prefill = CorrectionPlan([5], shifts, mask)
    assert prefill.on_output(4, torch.zeros(2, 3, 2)) is None  # layer not edited
    edited = prefill.on_output(5, torch.zeros(2, 3, 2))
    assert edited[0].tolist() == [[0, 0], [-1, -2], [-1, -2]] and edited[1].abs().sum() == 0
    decode = CorrectionPlan([5], torch.tensor([[[3.0, 4.0], [0.0, 0.0]]]))  # no mask: a step
    step = decode.on_output(5, torch.zeros(2, 1, 2))
    assert step[0, 0].tolist() == [-3, -4] and step[1].abs().sum() == 0
    with pytest.raises(GuardrailError, match="more than one new token"):
        decode.on_output(5, torch.zeros(2, 3, 2))


def test_lockstep_subtracts_the_live_difference_of_the_reference_rows():
    """Row 0 is corrected by alpha * (row 1 - row 2), incrementally over the edited layers."""
    zeros = torch.zeros(2, 3, 2)
    step = Lockstep(
        main=torch.tensor([0]),
        corrupted=torch.tensor([1]),
        text=torch.tensor([2]),
        alpha=torch.tensor([[0.5]]),
    )
    plan = CorrectionPlan([0, 1], zeros, torch.ones(3, 2, dtype=torch.bool), step)
    hidden = torch.tensor([[[0.0, 0.0]], [[4.0, 2.0]], [[2.0, 2.0]]]).expand(3, 2, 2)
    out0 = plan.on_output(0, hidden.clone())
    assert out0[0, -1].tolist() == [-1.0, 0.0] and torch.equal(out0[1:], hidden[1:])
    later = torch.tensor([[[0.0, 0.0]], [[10.0, 2.0]], [[2.0, 2.0]]]).expand(3, 2, 2)
    out1 = plan.on_output(1, later.clone())  # incremental: (8, 0) - (2, 0) = (6, 0), times 0.5
    assert out1[0, -1].tolist() == [-3.0, 0.0]
    assert plan.live_norms.tolist() == [8.0]


def test_row_trim_cuts_batch_arguments_and_pads_the_head():
    trim = RowTrim(after=1, keep=2, total=6)
    hidden, mask = torch.randn(6, 4, 8), torch.ones(6, 1, 4, 4, dtype=torch.bool)
    cos_sin = (torch.randn(6, 4, 2), torch.randn(1, 4, 2))  # one per row, one broadcast
    args, kwargs = trim.layer_inputs(
        "Layer",
        (hidden,),
        {"attention_mask": mask, "position_embeddings": cos_sin, "use_cache": True},
    )
    assert trim.state == "on" and torch.equal(args[0], hidden[:2])
    assert kwargs["attention_mask"].shape[0] == 2 and kwargs["use_cache"] is True
    assert kwargs["position_embeddings"][0].shape[0] == 2
    assert kwargs["position_embeddings"][1] is cos_sin[1]
    logits = trim.head_output(torch.ones(2, 1, 5))
    assert logits.shape == (6, 1, 5) and logits[2:].abs().sum() == 0 and logits[:2].sum() == 10


def test_row_trim_leaves_a_layer_with_unknown_batch_arguments_whole():
    """Decided once at the first trimmed layer of the prefill, so the KV cache stays whole."""
    trim = RowTrim(after=1, keep=2, total=6)
    hidden = torch.randn(6, 4, 8)
    assert trim.layer_inputs("OddLayer", (hidden,), {"row_scale": torch.ones(6)}) is None
    assert trim.state == "off" and "OddLayer" in trim.reason and "row_scale" in trim.reason
    assert trim.layer_inputs("OddLayer", (hidden,), {}) is None  # and for the rest of the call
    assert trim.head_input(hidden).shape[0] == 2  # the head keeps no cache: still trimmed


def test_incremental_stacking_subtracts_each_layers_shift_once(tiny_vlm, image):
    shift = tiny_vlm.compute_dataset_shift(ANCHORS, progress=False, activate=False)
    for incremental, expected in (
        (True, [shift.vectors[1], shift.vectors[3] - shift.vectors[1]]),
        (False, [shift.vectors[1], shift.vectors[3]]),
    ):
        torch.testing.assert_close(
            stacked_shifts(shift.vectors, [1, 3], incremental), torch.stack(expected)
        )


def test_bad_images_raise_typed_errors(tiny_vlm, image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    png = buffer.getvalue()
    for bad in (b"not an image at all", png[: len(png) // 2], b""):
        with pytest.raises(InvalidImageError):
            tiny_vlm.generate("What?", [bad], max_new_tokens=2)
    with pytest.raises(InvalidImageError, match="out of range"):
        tiny_vlm.generate("What?", [Image.new("RGB", (9000, 9000))], max_new_tokens=2)
    assert tiny_vlm.generate("What?", [png], max_new_tokens=2).decision.multimodal


def test_image_without_placeholder_is_refused(tiny_vlm, image):
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is it?"}]}]
    with pytest.raises(MissingImagePlaceholderError, match="1 image"):
        tiny_vlm.generate(messages, [image], max_new_tokens=2)
    with_part = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}]
    with pytest.raises(InvalidInputError, match="placeholder"):
        tiny_vlm.generate(with_part, [], max_new_tokens=2)
    assert tiny_vlm.generate(with_part, [image], max_new_tokens=2).decision.multimodal


def test_shift_of_another_model_or_shape_is_refused(tiny_vlm, tiny_path, image):
    shift = tiny_vlm.compute_dataset_shift(ANCHORS[:1], progress=False, activate=False)
    other = AutoModelForImageTextToText.from_pretrained(tiny_path)
    with torch.no_grad():
        other.get_decoder().layers[0].mlp.down_proj.weight.mul_(1.01)  # a "fine-tuned" copy
    other_vlm = GuardedVLM.from_model(other, tiny_vlm.processor)
    assert other_vlm.fingerprint.id != tiny_vlm.fingerprint.id
    with pytest.raises(ShiftMismatchError, match="computed on model"):
        other_vlm.set_dataset_shift(shift)
    with pytest.raises(ShiftMismatchError):
        other_vlm.generate("What?", [image], mode="dataset", shift=shift, max_new_tokens=2)
    wrong_shape = ShiftVector(
        vectors=torch.zeros(3, 64),
        meta=shift.meta.model_copy(
            update={"model": shift.meta.model.model_copy(update={"num_layers": 3})}
        ),
    )
    with pytest.raises(ShiftMismatchError, match="shape"):
        tiny_vlm.set_dataset_shift(wrong_shape)
    # the same checkpoint loaded again has the same fingerprint
    assert GuardedVLM.from_pretrained(str(tiny_path)).fingerprint.id == tiny_vlm.fingerprint.id


def test_model_without_decoder_is_refused():
    class NoDecoder(torch.nn.Module):
        def get_decoder(self):
            return torch.nn.Linear(2, 2)

    with pytest.raises(DecoderNotFoundError, match="NoDecoder"):
        TransformersBackend(NoDecoder(), processor=None, family="llava")


def test_bad_layer_config_is_refused(tiny_vlm):
    with pytest.raises(InvalidInputError, match="out of range"):
        tiny_vlm.with_config(GuardConfig(layers=(7,)))


def test_concurrent_calls_never_see_each_others_correction(tiny_vlm):
    """Thread A holds an active strong correction; thread B's unguarded forward is unaffected."""
    request = GuardRequest("What is this?", [synthetic_image(2, (64, 64))], mode="off")
    clean, _ = tiny_vlm.next_token_logits([request])
    strong = torch.full((tiny_vlm.num_layers, 1, tiny_vlm.hidden_size), 50.0)
    plan = CorrectionPlan(
        range(tiny_vlm.num_layers), strong, strong, torch.ones(1, 1, dtype=torch.bool)
    )
    inside, release = threading.Event(), threading.Event()

    def hold() -> None:
        with tiny_vlm.backend.hooks.activate(plan):
            inside.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    assert inside.wait(10)
    try:
        during, _ = tiny_vlm.next_token_logits([request])
    finally:
        release.set()
        holder.join()
    assert torch.equal(during, clean)


def test_threads_with_different_alpha_match_their_sequential_answers(tiny_vlm):
    vlm = tiny_vlm.with_config(GuardConfig(layers=(0, 1, 2, 3), positions="all"))
    img = synthetic_image(3, (64, 64))
    alphas = [0.0, 2.0, 5.0]
    expected = {
        a: vlm.generate("Describe it.", [img], alpha=a, mode="sample", max_new_tokens=8).token_ids
        for a in alphas
    }
    assert len({tuple(t) for t in expected.values()}) == 3  # the alphas really differ
    results: dict[float, list[list[int]]] = {a: [] for a in alphas}
    barrier = threading.Barrier(len(alphas))

    def worker(alpha: float) -> None:
        barrier.wait()
        for _ in range(4):
            out = vlm.generate("Describe it.", [img], alpha=alpha, mode="sample", max_new_tokens=8)
            results[alpha].append(out.token_ids)

    threads = [threading.Thread(target=worker, args=(a,)) for a in alphas]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for alpha in alphas:
        assert results[alpha] == [expected[alpha]] * 4
    assert all(len(layer._forward_hooks) == 0 for layer in vlm.backend.layers)


def test_bfloat16_model_is_guarded_in_its_own_dtype(tiny_path, image):
    vlm = GuardedVLM.from_pretrained(str(tiny_path), dtype="bfloat16")
    assert vlm.model.dtype == torch.bfloat16
    shift = vlm.compute_dataset_shift(ANCHORS, progress=False)
    assert shift.vectors.dtype == torch.float32  # stored in float32 whatever the model dtype
    for mode in ("dataset", "sample"):
        out = vlm.generate("What is this?", [image], mode=mode, max_new_tokens=3)
        assert out.decision.guarded and out.decision.shift_norm > 0


def test_the_callers_tokenizer_is_left_as_it_was(tiny_path, image):
    """Left padding is asked for per call; the processor handed in keeps its own setting."""
    processor = AutoProcessor.from_pretrained(tiny_path)
    processor.tokenizer.padding_side = "right"
    vlm = GuardedVLM.from_model(AutoModelForImageTextToText.from_pretrained(tiny_path), processor)
    blank = corruption_image(vlm.config.corruption, image.size)
    strict = vlm.with_config(GuardConfig(layers=(-1,), mode="sample"))
    text, _ = strict.next_token_logits([GuardRequest("What is it?")])
    guarded, _ = strict.next_token_logits([GuardRequest("What is it?", [blank])])
    assert (guarded - text).abs().max() < 1e-3  # the shorter text-only row was left-padded
    assert processor.tokenizer.padding_side == "right"


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def test_images_over_the_pixel_budget_are_refused_before_decoding(tiny_vlm):
    huge_png = _encoded(Image.new("RGBA", (8000, 8000)), "PNG")  # 64 MP in a few hundred kB
    assert len(huge_png) < 1_000_000
    with pytest.raises(InvalidImageError, match="at most 16,000,000 pixels") as info:
        tiny_vlm.generate("What?", [huge_png], max_new_tokens=2)
    assert info.value.decision.mode_used == "refused"
    strict = tiny_vlm.with_config(GuardConfig(max_image_pixels=1_000))
    with pytest.raises(InvalidImageError, match="at most 1,000 pixels"):
        strict.generate("What?", [synthetic_image(1, (48, 40))], max_new_tokens=2)


@pytest.mark.parametrize("size", [(200_000, 1), (2000, 1), (1, 5000), (2100, 100)])
def test_elongated_images_are_refused_from_their_header(tiny_vlm, size):
    """A 1-pixel-high PNG of a few hundred bytes is within any pixel budget, but the processor's
    resize (shortest side up to its working size) would blow it up to gigabytes."""
    data = _encoded(Image.new("L", size), "PNG")
    assert len(data) < 10_000
    with pytest.raises(InvalidImageError, match="too elongated") as info:
        tiny_vlm.generate("What?", [data], max_new_tokens=2)
    assert info.value.decision.mode_used == "refused"
    assert render_request(GuardRequest("What?", [_encoded(Image.new("L", (2000, 100)), "PNG")]))


def test_input_limits_refuse_before_any_model_work(tiny_vlm, image):
    """Images per request, prompt length (the model's context by default: 2048 tokens here)
    and nesting depth are checked first; each refusal is typed, fast and recorded."""
    few = tiny_vlm.with_config(GuardConfig(max_images=2))
    parts = [{"type": "image"}] * 3 + [{"type": "text", "text": "?"}]
    with pytest.raises(InvalidInputError, match="3 images in one request") as info:
        few.generate([{"role": "user", "content": parts}], [image] * 3, max_new_tokens=2)
    assert info.value.decision.mode_used == "refused"
    long_prompt = " ".join(f"w{i}" for i in range(12_000))  # 77 kB, under the byte ceiling
    started = time.perf_counter()
    with pytest.raises(InvalidInputError, match=r"tokens \(at most 2,048\)") as info:
        tiny_vlm.generate(long_prompt, [image], max_new_tokens=2)
    assert time.perf_counter() - started < 2.0 and info.value.decision.mode_used == "refused"
    with pytest.raises(InvalidInputError, match="refused unread"):
        tiny_vlm.generate("x" * 2048 * 65, max_new_tokens=2)
    deep: object = "leaf"
    for _ in range(100):
        deep = {"k": deep}
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": deep}}
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c", "content": "ok"},
    ]
    with pytest.raises(InvalidInputError, match=r"nests 10[0-9] levels deep"):
        tiny_vlm.generate(messages, max_new_tokens=2)
    with pytest.raises(InvalidInputError, match="nested too deeply"):
        parse_json("[" * 5000 + "]" * 5000, "tool call arguments")
    assert tiny_vlm.generate(long_prompt[:200], [image], max_new_tokens=2).decision.guarded


def test_large_images_are_reduced_to_a_working_size_right_after_decoding():
    jpeg = _encoded(synthetic_image(2, (6000, 3000)), "JPEG")  # 18 MP: over the budget
    assert render_request(GuardRequest("What?", [jpeg])).images[0].size == (1500, 750)
    png = _encoded(synthetic_image(3, (4000, 3000)), "PNG")  # 12 MP: within the budget
    assert render_request(GuardRequest("What?", [png])).images[0].size == (2000, 1500)
    small = synthetic_image(4, (640, 480))
    assert render_request(GuardRequest("What?", [small])).images[0].size == (640, 480)


def test_bias_and_penalties_match_transformers_own_processors(tiny_vlm, image):
    """With the guard off, repetition_penalty and logit_bias give exactly what transformers'
    RepetitionPenaltyLogitsProcessor and SequenceBiasLogitsProcessor give (prompt included)."""
    inputs = tiny_vlm.encode([render_request(GuardRequest("Describe it.", [image]))])
    prompt_length = inputs["input_ids"].shape[1]
    pad = tiny_vlm.tokenizer.pad_token_id
    plain = tiny_vlm.generate("Describe it.", [image], max_new_tokens=12, mode="off")
    favoured = next(t for t in range(5, 50) if t not in plain.token_ids)
    for ours, theirs in (
        ({"repetition_penalty": 1.5}, {"repetition_penalty": 1.5}),
        ({"logit_bias": {favoured: 100.0}}, {"sequence_bias": {(favoured,): 100.0}}),
    ):
        with torch.no_grad():
            raw = tiny_vlm.model.generate(
                **inputs, max_new_tokens=12, do_sample=False, pad_token_id=pad, **theirs
            )
        out = tiny_vlm.generate("Describe it.", [image], max_new_tokens=12, mode="off", **ours)
        assert out.token_ids == raw[0, prompt_length:].tolist()[: len(out.token_ids)]
        assert out.token_ids != plain.token_ids, ours
    biased = tiny_vlm.generate(
        "Describe it.", [image], max_new_tokens=3, logit_bias={favoured: 100}
    )
    assert biased.token_ids == [favoured] * 3 and biased.decision.guarded
    with pytest.raises(InvalidInputError, match="outside the vocabulary") as info:
        tiny_vlm.generate("Describe it.", [image], max_new_tokens=2, logit_bias={10**9: 1.0})
    assert info.value.decision.mode_used == "refused"


def test_frequency_and_presence_penalties_count_the_answer_so_far():
    scores = torch.zeros(6)
    penalize(scores, Sampling(frequency_penalty=0.5, presence_penalty=0.25), None, [1, 1, 3])
    assert scores.tolist() == [0.0, -1.25, 0.0, -0.75, 0.0, 0.0]
    scores = torch.tensor([2.0, -2.0, 2.0, 0.5])
    penalize(scores, Sampling(repetition_penalty=2.0), torch.tensor([0]), [1])
    assert scores.tolist() == [1.0, -4.0, 2.0, 0.5]


def test_min_p_of_one_keeps_only_the_top_token(tiny_vlm, image):
    greedy = tiny_vlm.generate("Describe it.", [image], max_new_tokens=8)
    sampled = tiny_vlm.generate(
        "Describe it.", [image], max_new_tokens=8, do_sample=True, temperature=1.0, min_p=1.0
    )
    assert sampled.token_ids == greedy.token_ids


def test_logprobs_come_from_the_corrected_request_row(tiny_vlm, image):
    """Each answer token's log-probability is read off the request row after the correction
    (the guarded distribution), with the most likely alternatives in order."""
    guarded = GuardRequest("Describe it.", [image], mode="sample", alpha=2.0)
    unguarded = GuardRequest("Describe it.", [image], mode="off")
    logits, _ = tiny_vlm.next_token_logits([guarded, unguarded])
    expected, plain = logits.log_softmax(-1)
    output = tiny_vlm.generate_batch([guarded], max_new_tokens=3, logprobs=3)[0]
    assert output.logprobs is not None and len(output.logprobs) == len(output.token_ids)
    first = output.logprobs[0]
    assert first.token_id == output.token_ids[0] == int(expected.argmax())  # greedy
    assert first.logprob == pytest.approx(float(expected.max()), abs=1e-4)
    assert first.token == tiny_vlm.tokenizer.decode([first.token_id])
    assert [t.token_id for t in first.top] == expected.topk(3).indices.tolist()
    assert first.logprob != pytest.approx(float(plain[first.token_id]), abs=1e-3)
    assert tiny_vlm.generate_batch([guarded], max_new_tokens=3)[0].logprobs is None
