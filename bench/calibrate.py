"""Dataset-level calibration throughput and memory on the SmolLM2 fixture (CPU).

Anchor samples per second at several batch sizes, and the peak resident memory of a fresh process
that loads the model and calibrates on N anchors (N = 16 and 64 at batch 8): flat in N means the
pass streams. Prints a table and a final JSON line.
"""

from __future__ import annotations

import json
import logging
import resource
import subprocess
import sys
import time

import torch

from guardrail import GuardedVLM
from guardrail.testing import anchor_prompts, fixture_path


def anchors(n: int) -> list[str]:
    prompts = anchor_prompts()
    return [f"{prompts[i % len(prompts)]} (variant {i})" for i in range(n)]


def throughput(batch_sizes: list[int], n: int) -> list[dict]:
    vlm = GuardedVLM.from_pretrained(str(fixture_path("smollm")))
    vlm.compute_dataset_shift(anchors(4), batch_size=4, progress=False)  # warm-up
    rows = []
    for batch in batch_sizes:
        started = time.perf_counter()
        vlm.compute_dataset_shift(anchors(n), batch_size=batch, progress=False, activate=False)
        seconds = time.perf_counter() - started
        rows.append({"batch_size": batch, "anchors": n, "seconds": round(seconds, 2),
                     "anchors_per_s": round(n / seconds, 2)})
        print(f"batch {batch:>2}: {n / seconds:6.2f} anchors/s ({seconds:.1f} s for {n})",
              flush=True)
    return rows


def peak_rss_mib(n: int) -> float:
    """Peak RSS of a fresh process loading the model and calibrating on ``n`` anchors."""
    out = subprocess.run([sys.executable, __file__, "--child", str(n)], capture_output=True,
                         text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def child(n: int) -> None:
    torch.set_num_threads(2)
    vlm = GuardedVLM.from_pretrained(str(fixture_path("smollm")))
    if n:
        vlm.compute_dataset_shift(anchors(n), batch_size=8, progress=False)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def main() -> None:
    logging.getLogger("guardrail.decisions").setLevel(logging.ERROR)
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(int(sys.argv[2]))
        return
    torch.set_num_threads(2)
    rows = throughput([1, 4, 8, 16], 32)
    memory = {str(n): round(peak_rss_mib(n), 1) for n in (0, 16, 64)}
    print("peak RSS MiB (load only, 16 anchors, 64 anchors): "
          + ", ".join(memory.values()))
    print(json.dumps({"benchmark": "calibrate", "throughput": rows, "peak_rss_mib": memory}))


if __name__ == "__main__":
    main()
