"""Cost of an adversarial image: a 64 MP RGBA PNG of a few hundred kB, or a 1-pixel-high one.

Each variant runs in a fresh process (tiny fixture, peak-RSS mark reset after loading): one
guarded call with an ordinary 224 px image (the baseline); the 64 MP image under the default
pixel budget (refused from its header); the largest image the default budget accepts (16 MP);
the 64 MP image under a 64 MP budget (the old limit: decoded, then processed); a 661-byte
200000x1 PNG under the default limits (refused from its header) and with the aspect-ratio and
resize limits lifted (what it cost before: the processor's resize enlarges it); and a 2000x1
image under LLaVA-1.5's own CLIP settings (shortest edge 336): the guard's refusal (by the
aspect ratio, and by the resize budget alone when the aspect limit is lifted), and the
processor alone, unguarded. Prints added peak RSS and seconds per variant, and a final JSON line.
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import time

from PIL import Image
from rss import reset_peak, status_mib
from transformers import CLIPImageProcessorPil

from guardrail import GuardConfig, GuardedVLM, GuardrailError
from guardrail.testing import fixture_path, synthetic_image

VARIANTS = (
    "ordinary",
    "adversarial-default-budget",
    "largest-accepted-16mp",
    "adversarial-64mp-budget",
    "thin-200000x1-default-limits",
    "thin-200000x1-limits-lifted",
    "thin-2000x1-clip336-guarded",
    "thin-2000x1-clip336-aspect-lifted",
    "thin-2000x1-clip336-processor-alone",
)
LIFTED = {"max_image_aspect_ratio": 1e9, "max_resized_pixels": 10**15}
CHILD_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}


def _png(size: tuple[int, int], mode: str = "RGBA") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format="PNG")
    return buffer.getvalue()


def child(variant: str) -> None:
    logging.getLogger("guardrail.decisions").setLevel(logging.ERROR)
    budget = 64_000_000 if variant.endswith("64mp-budget") else GuardConfig().max_image_pixels
    lifted = LIFTED if variant.endswith("limits-lifted") else {}
    if variant.endswith("aspect-lifted"):  # the resize budget alone
        lifted = {"max_image_aspect_ratio": 1e9}
    vlm = GuardedVLM.from_pretrained(
        str(fixture_path("tiny")),
        config=GuardConfig(mode="sample", max_image_pixels=budget, **lifted),
    )
    if variant.startswith("thin-2000x1-clip336"):
        clip336 = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size=336)
        vlm.backend.processor.image_processor = clip336  # LLaVA-1.5's image settings
    if variant == "ordinary":
        image: object = synthetic_image(0)
    elif variant.startswith("thin-200000x1"):
        image = _png((200_000, 1), "L")
    elif variant.startswith("thin-2000x1"):
        image = _png((2000, 1), "L")
    else:
        buffer = io.BytesIO()
        side = 4000 if variant.startswith("largest") else 8000
        Image.new("RGBA", (side, side), (10, 20, 30, 255)).save(buffer, format="PNG")
        image = buffer.getvalue()
    before = reset_peak()
    started = time.perf_counter()
    try:
        if variant.endswith("processor-alone"):
            vlm.backend.processor.image_processor(Image.open(io.BytesIO(image)).convert("RGB"))
            outcome = "processed"
        else:
            vlm.generate("What is in the picture?", [image], max_new_tokens=4)
            outcome = "answered"
    except GuardrailError as e:
        outcome = f"refused: {type(e).__name__}"
    seconds = time.perf_counter() - started
    print(
        json.dumps(
            {
                "variant": variant,
                "outcome": outcome,
                "seconds": round(seconds, 3),
                "added_peak_mib": round(status_mib("VmHWM") - before, 1),
            }
        )
    )


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2])
        return
    rows = []
    for variant in VARIANTS:
        done = subprocess.run(
            [sys.executable, __file__, "--child", variant],
            env=CHILD_ENV,
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    base = rows[0]
    for r in rows:
        print(
            f"{r['variant']:36} {r['outcome']:28} {r['seconds']:7.3f}s "
            f"(x{r['seconds'] / base['seconds']:.2f})  +{r['added_peak_mib']:.0f} MiB peak"
        )
    print(json.dumps({"benchmark": "image_budget", "rows": rows}))


if __name__ == "__main__":
    main()
