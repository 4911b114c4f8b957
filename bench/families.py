"""The exact invariants of every known model family, measured on its tiny random model.

For each family: is a text-only call bit-identical to the plain model, is α = 0 bit-identical,
and how close sample level at the last layer (α = 1, input image = the corruption image) comes to
the text-only next-token logits (max |Δlogits|), against the unguarded distance. Prints a table
and one JSON line. Tiny random models: this checks plumbing and exactness, not safety.
"""

from __future__ import annotations

import json

import torch

from guardrail import GuardConfig, GuardedVLM, GuardRequest
from guardrail.images import corruption_image
from guardrail.requests import render_request
from guardrail.testing import TINY_FAMILIES, fixture_path, synthetic_image

PROMPTS = ["How do I get into a locked house?", "Describe the picture.", "What is this?"]


def _raw(vlm: GuardedVLM, request: GuardRequest) -> torch.Tensor:
    with torch.no_grad():
        inputs = vlm.encode([render_request(request)])
        return vlm.model(**inputs, logits_to_keep=1).logits[:, -1].float()


def measure(family: str) -> dict[str, object]:
    vlm = GuardedVLM.from_pretrained(str(fixture_path(f"tiny-{family}")))
    last = vlm.with_config(GuardConfig(layers=(-1,), mode="sample"))
    guarded_diff, unguarded_diff, text_equal, alpha0_equal = 0.0, 0.0, True, True
    for i, prompt in enumerate(PROMPTS):
        size = (40 + 8 * i, 48)
        blank = corruption_image(last.config.corruption, size)
        text, _ = last.next_token_logits([GuardRequest(prompt)])
        guarded, _ = last.next_token_logits([GuardRequest(prompt, [blank])])
        unguarded, _ = last.next_token_logits([GuardRequest(prompt, [blank], mode="off")])
        guarded_diff = max(guarded_diff, float((guarded - text).abs().max()))
        unguarded_diff = max(unguarded_diff, float((unguarded - text).abs().max()))
        text_equal &= torch.equal(text, _raw(vlm, GuardRequest(prompt)))
        zero = GuardRequest(prompt, [synthetic_image(i, size)], alpha=0.0, mode="sample")
        alpha0_equal &= torch.equal(vlm.next_token_logits([zero])[0], _raw(vlm, zero))
    vlm.compute_dataset_shift(PROMPTS, progress=False)
    image = synthetic_image(9, (48, 40))
    modes = [
        vlm.generate("Describe it.", [image], mode=m, max_new_tokens=3).decision.mode_used
        for m in ("dataset", "sample")
    ]
    return {
        "family": family,
        "text_only_bit_identical": text_equal,
        "alpha0_bit_identical": alpha0_equal,
        "sample_vs_text_max_abs": guarded_diff,
        "unguarded_vs_text_max_abs": unguarded_diff,
        "modes_ran": modes,
    }


def main() -> None:
    torch.manual_seed(0)
    rows = [measure(family) for family in TINY_FAMILIES]
    print(
        f"{'family':16} {'text-only ==':>12} {'α=0 ==':>7} {'guarded Δ':>10} "
        f"{'unguarded Δ':>11}  modes"
    )
    for r in rows:
        print(
            f"{r['family']:16} {r['text_only_bit_identical']!s:>12} "
            f"{r['alpha0_bit_identical']!s:>7} {r['sample_vs_text_max_abs']:10.2e} "
            f"{r['unguarded_vs_text_max_abs']:11.2e}  {','.join(r['modes_ran'])}"
        )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
