"""Peak memory of one guarded call per variant, each in a fresh process (CPU: peak RSS).

After loading, the kernel's peak-RSS mark is reset (``/proc/self/clear_refs``), so the peak
covers the call alone (weights included, they are resident). Reports that peak and its increment
over the RSS before the call, as ratios to the unguarded call. ``sample-untrimmed`` runs the
reference rows through every layer (``trim_references=False``). SmolLM2 fixture, batch 1 and 8,
128 new tokens. Prints a table and a final JSON line.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile

import torch
from rss import reset_peak, status_mib

from guardrail import GuardConfig, GuardedVLM, GuardRequest
from guardrail.testing import anchor_prompts, fixture_path, synthetic_image

VARIANTS = ("unguarded", "dataset", "sample-untrimmed", "sample-lockstep")
# A fixed mmap threshold: freed tensor buffers go back to the kernel at once, so peak RSS tracks
# peak live memory instead of how glibc's heap happened to fragment (+-8% run to run without).
CHILD_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}


def child(variant: str, store: str, batch: int) -> None:
    torch.set_num_threads(2)
    logging.getLogger("guardrail.decisions").setLevel(logging.ERROR)
    config = GuardConfig(trim_references=variant != "sample-untrimmed")
    vlm = GuardedVLM.from_pretrained(str(fixture_path("smollm")), config=config, store=store)
    mode = {"unguarded": "off", "dataset": "dataset"}.get(variant, "sample")
    requests = [
        GuardRequest(anchor_prompts()[i], [synthetic_image(i)], mode=mode) for i in range(batch)
    ]
    before = reset_peak()
    vlm.generate_batch(requests, max_new_tokens=128, min_new_tokens=128)
    print(before, status_mib("VmHWM"))


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        store = f"file://{folder}"
        vlm = GuardedVLM.from_pretrained(str(fixture_path("smollm")))
        vlm.use_store(store, anchors=anchor_prompts()[:8])  # prepared once, loaded by children
        for batch in (1, 8):
            runs = {}
            for variant in VARIANTS:
                out = subprocess.run(
                    [sys.executable, __file__, "--child", variant, store, str(batch)],
                    capture_output=True,
                    text=True,
                    check=True,
                    env=CHILD_ENV,
                ).stdout
                before, peak = map(float, out.strip().splitlines()[-1].split())
                runs[variant] = (peak, peak - before)
            base_peak, base_increment = runs["unguarded"]
            for variant, (peak, increment) in runs.items():
                rows.append(
                    {
                        "batch": batch,
                        "variant": variant,
                        "peak_mib": round(peak, 1),
                        "peak_ratio": round(peak / base_peak, 3),
                        "increment_mib": round(increment, 1),
                        "increment_ratio": round(increment / base_increment, 3),
                    }
                )
                r = rows[-1]
                print(
                    f"b={batch} {variant:16} peak {r['peak_mib']:8.1f} MiB "
                    f"x{r['peak_ratio']:.3f}   call increment {r['increment_mib']:7.1f} MiB "
                    f"x{r['increment_ratio']:.3f}",
                    flush=True,
                )
    print(json.dumps({"benchmark": "memory", "rows": rows}))


if __name__ == "__main__":
    main()
