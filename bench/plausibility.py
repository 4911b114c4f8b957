"""Cost of the plausibility check of a stored shift (``guardrail/plausibility.py``).

The first check in a process measures a live reference (4 anchor prompts, 4 answer tokens);
later checks of the same vector are a dictionary lookup. Both are printed as a ratio to one
unguarded 32-token call measured in the same run, and the agreement of genuine and poisoned
vectors with the reference. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from guardrail import GuardConfig, GuardedVLM, GuardRequest
from guardrail.plausibility import PlausibilityCheck
from guardrail.testing import anchor_prompts, fixture_path, synthetic_image
from shift_store import ShiftVector


def run(fixture: str) -> dict[str, object]:
    vlm = GuardedVLM.from_pretrained(str(fixture_path(fixture)), config=GuardConfig(mode="off"))
    shift = vlm.compute_dataset_shift(anchor_prompts(), progress=False, activate=False)
    request = GuardRequest("Describe the picture.", [synthetic_image(0)])
    vlm.generate_batch([request], max_new_tokens=4)  # warm up
    started = time.perf_counter()
    vlm.generate_batch([request], max_new_tokens=32, min_new_tokens=32)
    call_s = time.perf_counter() - started
    check = PlausibilityCheck(vlm.backend, vlm.config.corruption)
    started = time.perf_counter()
    genuine = check.verdict(shift)
    first_s = time.perf_counter() - started
    started = time.perf_counter()
    check.verdict(shift)
    cached_s = time.perf_counter() - started
    negated = ShiftVector(vectors=-shift.vectors, meta=shift.meta)
    return {
        "fixture": fixture,
        "call_s": round(call_s, 4),
        "first_check_s": round(first_s, 4),
        "first_check_ratio": round(first_s / call_s, 3),
        "cached_check_us": round(cached_s * 1e6, 1),
        "genuine_problem": genuine,
        "negated_problem": check.problem(negated),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fixtures", nargs="*", default=["tiny", "smollm"])
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = [run(fixture) for fixture in args.fixtures]
    for r in rows:
        print(
            f"{r['fixture']:8} call {r['call_s']:.3f}s  first check {r['first_check_s']:.3f}s "
            f"(x{r['first_check_ratio']} of a call)  cached {r['cached_check_us']} us  "
            f"genuine: {r['genuine_problem'] or 'accepted'}  negated: {r['negated_problem']}"
        )
    print(json.dumps({"benchmark": "plausibility", "rows": rows}))


if __name__ == "__main__":
    main()
