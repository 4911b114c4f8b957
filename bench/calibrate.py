"""Dataset-level calibration throughput and memory on the SmolLM2 fixture (CPU).

Anchor samples per second at several batch sizes, and the peak resident memory of calibrating on
N anchors (N = 16, 64 and 256 at batch 8), each in a fresh process whose peak-RSS mark is reset
after loading the model: flat in N means the pass streams. Prints a table and a final JSON line.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time

import torch
from rss import reset_peak, status_mib

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
        rows.append(
            {
                "batch_size": batch,
                "anchors": n,
                "seconds": round(seconds, 2),
                "anchors_per_s": round(n / seconds, 2),
            }
        )
        print(
            f"batch {batch:>2}: {n / seconds:6.2f} anchors/s ({seconds:.1f} s for {n})", flush=True
        )
    return rows


def peak_rss_mib(n: int) -> tuple[float, float]:
    """RSS before and peak RSS during calibration on ``n`` anchors, in a fresh process."""
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(n)], capture_output=True, text=True, check=True
    ).stdout
    before, peak = map(float, out.strip().splitlines()[-1].split())
    return before, peak


def child(n: int) -> None:
    torch.set_num_threads(2)
    vlm = GuardedVLM.from_pretrained(str(fixture_path("smollm")))
    before = reset_peak()  # after loading
    vlm.compute_dataset_shift(anchors(n), batch_size=8, progress=False)
    print(before, status_mib("VmHWM"))


def main() -> None:
    logging.getLogger("guardrail.decisions").setLevel(logging.ERROR)
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(int(sys.argv[2]))
        return
    torch.set_num_threads(2)
    rows = throughput([1, 4, 8, 16], 32)
    memory = {}
    for n in (16, 64, 256):
        before, peak = peak_rss_mib(n)
        memory[str(n)] = {"rss_before_mib": round(before, 1), "peak_mib": round(peak, 1)}
        print(
            f"{n:>4} anchors: RSS {before:.0f} MiB before, peak {peak:.0f} MiB "
            f"(+{peak - before:.0f})",
            flush=True,
        )
    print(json.dumps({"benchmark": "calibrate", "throughput": rows, "peak_rss_mib": memory}))


if __name__ == "__main__":
    main()
