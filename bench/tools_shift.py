"""Do dataset-level shifts calibrated without tools still fit prompts that offer tools?

On the SmolLM2 fixture, two dataset-level shifts are calibrated on the even bundled anchor
prompts: one without tools (what a store holds today) and one with the same prompts offering
three tools. On the odd prompts, each with an image and offering 0, 1 or 3 tools, this prints
``KL(p_text || p)`` of the next-token distribution at the first generated position, where
``p_text`` is the same prompt (same tools) without the image, for: the image unguarded, the
dataset level with either shift, and the sample level (lower = closer to text-only behaviour).
The vision tower is untrained: this measures representation correction, not safety. Prints a
table and a final JSON line.
"""

from __future__ import annotations

import json
import logging

import torch

from guardrail import GuardedVLM, GuardRequest
from guardrail.testing import anchor_prompts, fixture_path, function_tool, synthetic_image

TOOLS = [
    function_tool("web_search", "Search the web.", query="string"),
    function_tool("add", "Add two integers.", a="integer", b="integer"),
    function_tool("screenshot", "Take a screenshot of a web page.", url="string"),
]


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    p, q = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def main() -> None:
    logging.getLogger("guardrail.decisions").setLevel(logging.ERROR)
    torch.manual_seed(0)
    prompts = anchor_prompts()
    calib, evaluation = prompts[::2], prompts[1::2]
    vlm = GuardedVLM.from_pretrained(str(fixture_path("smollm")))
    plain = vlm.compute_dataset_shift(calib, progress=False, activate=False)
    with_tools = vlm.compute_dataset_shift(
        [GuardRequest(p, tools=TOOLS) for p in calib], progress=False, activate=False
    )
    images = [synthetic_image(i) for i in range(len(evaluation))]
    rows = []
    for count in (0, 1, 3):
        tools = TOOLS[:count]

        def logits(mode: str | None, shift=None, with_image: bool = True, tools=tools):
            requests = [
                GuardRequest(p, [img] if with_image else [], tools=tools, mode=mode, shift=shift)
                for p, img in zip(evaluation, images, strict=True)
            ]
            return vlm.next_token_logits(requests)[0]

        text = logits(None, with_image=False)
        row = {
            "tools": count,
            "unguarded": kl(text, logits("off")),
            "dataset_no_tools_shift": kl(text, logits("dataset", plain)),
            "dataset_tools_shift": kl(text, logits("dataset", with_tools)),
            "sample": kl(text, logits("sample")),
        }
        rows.append({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
        print(
            f"tools={count}  KL unguarded {row['unguarded']:.4f}  dataset(no-tools shift) "
            f"{row['dataset_no_tools_shift']:.4f}  dataset(tools shift) "
            f"{row['dataset_tools_shift']:.4f}  sample {row['sample']:.4f}",
            flush=True,
        )
    cosine = float(
        torch.nn.functional.cosine_similarity(plain.vectors, with_tools.vectors, dim=-1)
        .mean()
        .item()
    )
    print(f"mean per-layer cosine between the two dataset shifts: {cosine:.4f}")
    print(json.dumps({"bench": "tools_shift", "rows": rows, "shift_cosine": round(cosine, 4)}))


if __name__ == "__main__":
    main()
