"""Choose the default edited layers and positions from a measurement on the SmolLM2 fixture.

For each candidate (layer set, position policy, stacking) with a dataset-level shift at alpha=1:
* KL(p_text || p_corrected) of the next-token distribution at the first generated position,
  where p_text is the distribution for the same prompt without any image (lower = closer);
* fluency: perplexity of the guarded greedy continuation scored by the same model on the
  text-only prompt (lower = more fluent and more text-like), and the share of distinct tokens.
The vision tower is untrained: this measures representation correction, not safety.
Prints a table and a final JSON line.
"""

from __future__ import annotations

import json
import math
import time

import torch

from guardrail import GuardConfig, GuardedVLM, GuardRequest
from guardrail.testing import anchor_prompts, fixture_path, synthetic_image

NEW_TOKENS = 24


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    p = p_logits.log_softmax(-1)
    q = q_logits.log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


@torch.no_grad()
def text_perplexity(vlm: GuardedVLM, prompts: list[str], continuations: list[list[int]]) -> float:
    nll, count = 0.0, 0
    for prompt, tokens in zip(prompts, continuations, strict=True):
        if not tokens:
            continue
        text = vlm.processor.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        ids = vlm.tokenizer(text, return_tensors="pt").input_ids
        full = torch.cat([ids, torch.tensor([tokens])], dim=1)
        logits = vlm.model(input_ids=full).logits[0, ids.shape[1] - 1 : -1].float()
        target = torch.tensor(tokens)
        nll += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
        count += len(tokens)
    return math.exp(nll / max(count, 1))


def main() -> None:
    torch.manual_seed(0)
    prompts = anchor_prompts()
    calib, evaluation = prompts[::2], prompts[1::2]
    base = GuardedVLM.from_pretrained(str(fixture_path("smollm")))
    n = base.num_layers
    base.compute_dataset_shift(calib, batch_size=8, anchor_name="bundled-even", progress=False)
    images = [synthetic_image(i) for i in range(len(evaluation))]
    mm = [GuardRequest(p, [img]) for p, img in zip(evaluation, images, strict=True)]
    text = [GuardRequest(p) for p in evaluation]
    text_logits, _ = base.next_token_logits(text)

    candidates: list[tuple[str, tuple[int, ...], str, str]] = [("unguarded", (-1,), "last", "off")]
    for positions in ("last", "text"):
        for layer in (n // 3, n // 2, 2 * n // 3, 5 * n // 6, n - 1):
            candidates.append((f"layer {layer}", (layer,), positions, "incremental"))
    for positions in ("last", "text"):
        candidates += [
            ("all layers", tuple(range(n)), positions, stacking)
            for stacking in ("independent", "incremental")
        ]
    rows = []
    for name, layers, positions, stacking in candidates:
        off = stacking == "off"
        cfg = GuardConfig(
            layers=layers,
            positions=positions,
            alpha=0.0 if off else 1.0,
            stacking="incremental" if off else stacking,
        )
        vlm = base.with_config(cfg)
        started = time.perf_counter()
        row = {"layers": name, "positions": positions, "stacking": stacking}
        for level in ("dataset", "sample"):
            requests = [GuardRequest(r.prompt, r.images, mode="off" if off else level) for r in mm]
            logits, _ = vlm.next_token_logits(requests)
            outs = vlm.generate_batch(requests, max_new_tokens=NEW_TOKENS)
            tokens = [o.token_ids for o in outs]
            row[f"kl_{level}"] = round(kl(text_logits, logits), 4)
            row[f"ppl_{level}"] = round(text_perplexity(vlm, evaluation, tokens), 2)
            row[f"distinct_{level}"] = round(
                sum(len(set(t)) / max(len(t), 1) for t in tokens) / len(tokens), 3
            )
            row[f"example_{level}"] = outs[0].text[:50]
        row["seconds"] = round(time.perf_counter() - started, 1)
        rows.append(row)
        print(
            f"{name:11} {positions:4} {stacking:11} "
            + " | ".join(
                f"{lv}: KL={row[f'kl_{lv}']:<7} ppl={row[f'ppl_{lv}']:<7} "
                f"distinct={row[f'distinct_{lv}']:<5}"
                for lv in ("dataset", "sample")
            )
            + f" | {row['example_sample']!r}",
            flush=True,
        )
    print(json.dumps({"benchmark": "choose_defaults", "alpha": 1.0, "rows": rows}))


if __name__ == "__main__":
    main()
