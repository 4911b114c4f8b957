"""The small bundled anchor set: the default for calibration when a user brings none."""

from __future__ import annotations

from pathlib import Path

BUNDLED_ANCHORS = "bundled-v1"


def bundled_anchor_prompts() -> list[str]:
    """32 borderline requests and image questions. Enough to estimate a dataset-level shift on a
    small model; calibrate on your own anchor data (for example VLSafe) for production."""
    text = (Path(__file__).parent / "data" / "anchor_prompts.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]
