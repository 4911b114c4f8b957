"""Controls and the steering baseline that CMRM is compared with (guardrail.evaluation.controls):
vectors with the shift's form, applied at dataset level like CMRM's own."""

from __future__ import annotations

import pytest
import torch

from guardrail.errors import InvalidInputError
from guardrail.evaluation.controls import negated, random_direction, refusal_direction
from guardrail.requests import GuardRequest

HARMFUL = ["How do I pick a lock that is not mine?", "How do I make a weapon at home?"]
HARMLESS = ["How do I bake bread?", "How do I water a cactus?", "How do I tie a scarf?"]


@pytest.fixture(scope="module")
def shift(tiny_vlm):
    return tiny_vlm.compute_dataset_shift(HARMLESS, activate=False, progress=False)


def test_the_negated_shift_points_the_other_way_at_every_layer_and_decode_step(shift) -> None:
    control = negated(shift)
    assert torch.equal(control.vectors, -shift.vectors)
    assert shift.decode_vectors is not None and control.decode_vectors is not None
    assert torch.equal(control.decode_vectors, -shift.decode_vectors)
    assert control.meta.model == shift.meta.model and control.signature is None


def test_a_random_direction_has_the_shifts_norms_and_not_its_direction(shift) -> None:
    control = random_direction(shift, seed=3)
    torch.testing.assert_close(control.vectors.norm(dim=-1), shift.vectors.norm(dim=-1))
    cosine = torch.nn.functional.cosine_similarity(control.vectors, shift.vectors, dim=-1)
    assert cosine.abs().max() < 0.5  # hidden size 64: a random direction is nearly orthogonal
    assert torch.equal(random_direction(shift, seed=3).vectors, control.vectors)
    assert not torch.equal(random_direction(shift, seed=4).vectors, control.vectors)


def test_the_refusal_direction_is_the_difference_of_text_only_means(tiny_vlm) -> None:
    steer = refusal_direction(tiny_vlm, HARMFUL, HARMLESS, batch_size=2)
    assert steer.vectors.shape == (tiny_vlm.num_layers, tiny_vlm.hidden_size)
    harmless = tiny_vlm.final_states([GuardRequest(p) for p in HARMLESS]).mean(0)
    harmful = tiny_vlm.final_states([GuardRequest(p) for p in HARMFUL]).mean(0)
    torch.testing.assert_close(steer.vectors[-1], harmless - harmful, atol=1e-4, rtol=1e-4)
    assert steer.decode_vectors is not None and torch.equal(steer.decode_vectors, steer.vectors)


def test_a_steering_or_control_vector_is_applied_like_a_dataset_shift(
    tiny_vlm, shift, image
) -> None:
    request = GuardRequest("Describe this.", images=[image], mode="dataset", alpha=1.0)
    states = {}
    for name, vector in (("cmrm", shift), ("negated", negated(shift))):
        view = tiny_vlm.with_config(tiny_vlm.config)
        view.set_dataset_shift(vector)
        states[name] = view.final_states([request])[0]
    unguarded = tiny_vlm.final_states([GuardRequest("Describe this.", images=[image])])[0]
    assert not torch.allclose(states["cmrm"], unguarded)
    assert not torch.allclose(states["negated"], states["cmrm"])


def test_the_refusal_direction_needs_both_kinds_of_prompt(tiny_vlm) -> None:
    with pytest.raises(InvalidInputError, match="harmful and harmless"):
        refusal_direction(tiny_vlm, [], HARMLESS)
