"""The engine's invariants, on the SmolLM2-backed fixture (real text weights)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from guardrail import GuardConfig, GuardRequest
from guardrail.images import corruption_image
from guardrail.requests import render_request
from guardrail.testing import SMOLLM_GGUF, smollm_gguf_dir

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea."]


@pytest.fixture(scope="module")
def plain_smollm():
    """SmolLM2 loaded straight from its GGUF file, with its own tokenizer and chat template."""
    tokenizer = AutoTokenizer.from_pretrained(smollm_gguf_dir(), gguf_file=SMOLLM_GGUF)
    model = AutoModelForCausalLM.from_pretrained(
        smollm_gguf_dir(), gguf_file=SMOLLM_GGUF, dtype=torch.float32
    ).eval()
    return tokenizer, model


def _hook_counts(vlm) -> list[int]:
    modules = [
        *vlm.backend.layers,
        vlm.model.get_input_embeddings(),
        vlm.model.get_output_embeddings(),
    ]
    return [len(module._forward_hooks) + len(module._forward_pre_hooks) for module in modules]


def test_text_only_equals_plain_smollm(smollm_vlm, plain_smollm):
    tokenizer, model = plain_smollm
    for prompt in PROMPTS:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt"
        )
        ids = ids["input_ids"] if not torch.is_tensor(ids) else ids
        plain = model.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=2)
        plain_tokens = plain[0, ids.shape[1] :].tolist()
        plain_tokens = plain_tokens[: plain_tokens.index(2)] if 2 in plain_tokens else plain_tokens
        out = smollm_vlm.generate(prompt, max_new_tokens=20)
        assert out.token_ids == plain_tokens
        assert out.decision.mode_used == "text-only" and not out.decision.guarded
        assert len(out.token_ids) > 3


def test_alpha_zero_and_off_equal_unguarded(smollm_vlm, image):
    inputs = smollm_vlm.encode([render_request(GuardRequest("Describe it.", [image]))])
    with torch.no_grad():
        raw = smollm_vlm.model.generate(
            **inputs,
            max_new_tokens=16,
            do_sample=False,
            pad_token_id=smollm_vlm.tokenizer.pad_token_id,
        )
        raw_logits = smollm_vlm.model(**inputs, logits_to_keep=1).logits[:, -1]
    raw_tokens = raw[0, inputs["input_ids"].shape[1] :].tolist()
    for kwargs in ({"alpha": 0.0, "mode": "sample"}, {"mode": "off"}):
        out = smollm_vlm.generate("Describe it.", [image], max_new_tokens=16, **kwargs)
        assert out.token_ids == raw_tokens[: len(out.token_ids)]
        assert out.decision.mode_used == "off" and not out.decision.guarded
        logits, _ = smollm_vlm.next_token_logits([GuardRequest("Describe it.", [image], **kwargs)])
        assert torch.equal(logits, raw_logits.float())


def test_sample_level_with_corruption_image_recovers_text_logits(smollm_vlm):
    vlm = smollm_vlm.with_config(GuardConfig(layers=(-1,), alpha=1.0, mode="sample"))
    prompt = "How do I get into a locked house?"
    blank = corruption_image(vlm.config.corruption, (200, 150))
    text_logits, _ = vlm.next_token_logits([GuardRequest(prompt)])
    guarded, decisions = vlm.next_token_logits([GuardRequest(prompt, [blank])])
    unguarded, _ = vlm.next_token_logits([GuardRequest(prompt, [blank], mode="off")])
    assert decisions[0].mode_used == "sample" and decisions[0].guarded
    assert (guarded - text_logits).abs().max() < 1e-3
    assert (unguarded - text_logits).abs().max() > 1.0


def test_sample_level_with_corruption_image_reproduces_the_text_only_answer(smollm_vlm):
    """Lockstep reference rows measure the shift at every generated token: at the last layer,
    an input image equal to the corruption image gives back the text-only answer exactly."""
    vlm = smollm_vlm.with_config(GuardConfig(layers=(-1,), alpha=1.0, mode="sample"))
    blank = corruption_image(vlm.config.corruption, (200, 150))
    changed_by_image = 0
    for prompt in PROMPTS:
        text = vlm.generate(prompt, max_new_tokens=16)
        guarded = vlm.generate(prompt, [blank], max_new_tokens=16)
        unguarded = vlm.generate(prompt, [blank], max_new_tokens=16, mode="off")
        assert guarded.token_ids == text.token_ids
        changed_by_image += unguarded.token_ids != text.token_ids
    assert changed_by_image >= 1  # without the guard, the image does change an answer


@pytest.mark.parametrize(
    "config",
    [GuardConfig(), GuardConfig(layers=(10, 25), positions="text")],
    ids=["default", "two-layers-text"],
)
def test_batched_mixed_alpha_equals_one_by_one(smollm_vlm, image, config):
    vlm = smollm_vlm.with_config(config)
    dataset = vlm.compute_dataset_shift(PROMPTS, batch_size=2, progress=False, activate=False)
    requests = [
        GuardRequest("What is in this picture?", [image], alpha=1.0, mode="sample"),
        GuardRequest("Hello! Who are you?"),
        GuardRequest(
            "Describe the colours you see here, please.",
            [image],
            alpha=0.4,
            mode="dataset",
            shift=dataset,
        ),
        GuardRequest("What is in this picture?", [image], alpha=0.0),
    ]
    batched = vlm.generate_batch(requests, max_new_tokens=12)
    single = [vlm.generate_batch([r], max_new_tokens=12)[0] for r in requests]
    assert [o.token_ids for o in batched] == [o.token_ids for o in single]
    assert [o.decision.mode_used for o in batched] == ["sample", "text-only", "dataset", "off"]
    assert batched[0].token_ids != batched[3].token_ids  # the correction did change the answer


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_no_hooks_left_after_call_exception_or_cancel(smollm_vlm, image, exc):
    before = _hook_counts(smollm_vlm)
    smollm_vlm.generate("Describe it.", [image], mode="sample", max_new_tokens=4)
    assert _hook_counts(smollm_vlm) == before
    seen: list[int] = []

    def raise_at_third_pass(_module, _args, _output):
        seen.append(sum(_hook_counts(smollm_vlm)))
        if len(seen) == 3:
            raise exc

    handle = smollm_vlm.backend.layers[0].register_forward_hook(raise_at_third_pass)
    try:
        with pytest.raises(type(exc)):
            smollm_vlm.generate("Describe it.", [image], mode="sample", max_new_tokens=8)
    finally:
        handle.remove()
    # hooked besides ours: the edited layer (25); trimming: layers 26-29 and the head (2)
    assert seen[0] == sum(before) + 1 + 1 + 4 + 2
    assert _hook_counts(smollm_vlm) == before


@pytest.mark.parametrize("layers", [None, (10, 25), (-1,)], ids=["default", "two-layers", "last"])
def test_trimmed_reference_rows_change_nothing(smollm_vlm, image, layers):
    """Reference rows skip the layers after the deepest edited one and the LM head; the request
    rows' logits and answers are exactly those of the untrimmed pass."""
    vlm = smollm_vlm.with_config(GuardConfig(layers=layers))
    whole = vlm.with_config(GuardConfig(layers=layers, trim_references=False))
    requests = [
        GuardRequest("What is in this picture?", [image], mode="sample"),
        GuardRequest(
            "Describe the colours you see here, please.", [image], alpha=2.0, mode="sample"
        ),
        GuardRequest("What is in this picture?", [image], mode="off"),
    ]
    last = vlm.backend.layers[-1]
    rows_seen: list[int] = []
    handle = last.register_forward_hook(lambda _m, _a, out: rows_seen.append(out.shape[0]))
    try:
        trimmed = vlm.generate_batch(requests, max_new_tokens=12)
        trimmed_rows, rows_seen[:] = list(rows_seen), []
        untrimmed = whole.generate_batch(requests, max_new_tokens=12)
    finally:
        handle.remove()
    deepest = vlm.layers[-1]
    expected_rows = 3 if deepest < vlm.num_layers - 1 else 3 + 2 * 2
    assert set(trimmed_rows) == {expected_rows} and set(rows_seen) == {3 + 2 * 2}
    assert [o.token_ids for o in trimmed] == [o.token_ids for o in untrimmed]
    assert [o.decision.shift_norm for o in trimmed] == [o.decision.shift_norm for o in untrimmed]
    logits, _ = vlm.next_token_logits(requests)
    reference, _ = whole.next_token_logits(requests)
    assert torch.allclose(logits, reference, atol=1e-4, rtol=0)
