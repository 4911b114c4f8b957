"""What caching the corruption image's vision features could save, measured inside real calls.

A sample-level call runs the vision tower and projector on every request image and on one
corruption image per request; the second half is the same every call and could be cached. Timed
with hooks on the vision tower and projector during a sample-level ``generate_batch``: the
cacheable time is half the vision time (same image size), reported as a share of the call.

    python bench/vision_share.py [--fixtures tiny smollm] [--tokens 32 128] [--batch 1 8]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time

import torch
from torch import nn

from guardrail import GuardedVLM, GuardRequest
from guardrail.testing import anchor_prompts, fixture_path, synthetic_image


class ModuleTimer:
    """Wall time spent inside some modules (synchronising the GPU around them)."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.seconds, self._started = 0.0, 0.0
        self._handles = [
            h
            for m in modules
            for h in (
                m.register_forward_pre_hook(self._enter),
                m.register_forward_hook(self._leave),
            )
        ]

    def _sync(self, module: nn.Module) -> None:
        parameter = next(module.parameters(), None)
        if parameter is not None and parameter.device.type == "cuda":
            torch.cuda.synchronize()

    def _enter(self, module: nn.Module, _args: tuple) -> None:
        self._sync(module)
        self._started = time.perf_counter()

    def _leave(self, module: nn.Module, _args: tuple, _output: object) -> None:
        self._sync(module)
        self.seconds += time.perf_counter() - self._started

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def vision_modules(vlm: GuardedVLM) -> list[nn.Module]:
    inner = getattr(vlm.model, "model", vlm.model)
    found = [getattr(inner, name, None) for name in ("vision_tower", "multi_modal_projector")]
    return [module for module in found if module is not None]


def vision_share(vlm: GuardedVLM, name: str, batch: int, tokens: int, repeats: int) -> dict:
    prompts = anchor_prompts()
    requests = [
        GuardRequest(prompts[i % len(prompts)], [synthetic_image(i)], mode="sample")
        for i in range(batch)
    ]
    vlm.generate_batch(requests[:1], max_new_tokens=2)  # warm-up
    shares, calls = [], []
    for _ in range(repeats):
        timer = ModuleTimer(vision_modules(vlm))
        started = time.perf_counter()
        try:
            vlm.generate_batch(requests, max_new_tokens=tokens, min_new_tokens=tokens)
        finally:
            timer.remove()
        call = time.perf_counter() - started
        calls.append(call)
        shares.append(timer.seconds / 2 / call)
    row = {
        "fixture": name,
        "batch": batch,
        "new_tokens": tokens,
        "call_s": round(statistics.median(calls), 4),
        "cacheable_share": round(statistics.median(shares), 5),
    }
    print(
        f"{name:14} b={batch:<2} N={tokens:<4} call {row['call_s']:8.3f}s  "
        f"corruption-image vision share {100 * row['cacheable_share']:.2f}%",
        flush=True,
    )
    return row


def main() -> None:
    logging.getLogger("guardrail.decisions").setLevel(logging.ERROR)
    parser = argparse.ArgumentParser()
    parser.add_argument("--fixtures", nargs="*", default=["tiny", "smollm"])
    parser.add_argument("--tokens", nargs="*", type=int, default=[32, 128])
    parser.add_argument("--batch", nargs="*", type=int, default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for name in args.fixtures:
        vlm = GuardedVLM.from_pretrained(str(fixture_path(name)))
        rows += [
            vision_share(vlm, name, b, n, args.repeats) for b in args.batch for n in args.tokens
        ]
    print(
        json.dumps({"benchmark": "vision_share", "threads": torch.get_num_threads(), "rows": rows})
    )


if __name__ == "__main__":
    main()
