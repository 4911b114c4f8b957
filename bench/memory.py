"""Peak memory of one guarded call per variant, each in a fresh process (CPU: peak RSS).

Reports the peak of (load + one call) and the increment over load alone, as ratios to the
unguarded call. SmolLM2 fixture, batch 1, 128 new tokens. Prints a table and a final JSON line.
"""

from __future__ import annotations

import json
import logging
import resource
import subprocess
import sys
import tempfile

import torch

from guardrail import GuardedVLM, GuardRequest
from guardrail.testing import anchor_prompts, fixture_path, synthetic_image

VARIANTS = ("load-only", "unguarded", "dataset", "sample-lockstep")


def child(variant: str, store: str) -> None:
    torch.set_num_threads(2)
    logging.getLogger("guardrail.decisions").setLevel(logging.ERROR)
    vlm = GuardedVLM.from_pretrained(str(fixture_path("smollm")), store=store)
    if variant != "load-only":
        mode = {"unguarded": "off", "dataset": "dataset", "sample-lockstep": "sample"}[variant]
        request = GuardRequest(anchor_prompts()[1], [synthetic_image(0)], mode=mode)
        vlm.generate_batch([request], max_new_tokens=128, min_new_tokens=128)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3])
        return
    with tempfile.TemporaryDirectory() as folder:
        store = f"file://{folder}"
        vlm = GuardedVLM.from_pretrained(str(fixture_path("smollm")))
        vlm.use_store(store, anchors=anchor_prompts()[:8])  # prepared once, loaded by children
        peaks = {}
        for variant in VARIANTS:
            out = subprocess.run([sys.executable, __file__, "--child", variant, store],
                                 capture_output=True, text=True, check=True).stdout
            peaks[variant] = float(out.strip().splitlines()[-1])
    load, base = peaks["load-only"], peaks["unguarded"]
    rows = []
    for variant in VARIANTS[1:]:
        rows.append({"variant": variant, "peak_mib": round(peaks[variant], 1),
                     "peak_ratio": round(peaks[variant] / base, 3),
                     "increment_mib": round(peaks[variant] - load, 1),
                     "increment_ratio": round((peaks[variant] - load) / (base - load), 3)})
        r = rows[-1]
        print(f"{variant:16} peak {r['peak_mib']:8.1f} MiB x{r['peak_ratio']:.3f}   "
              f"over load {r['increment_mib']:7.1f} MiB x{r['increment_ratio']:.3f}")
    print(json.dumps({"benchmark": "memory", "load_only_mib": round(load, 1), "rows": rows}))


if __name__ == "__main__":
    main()
