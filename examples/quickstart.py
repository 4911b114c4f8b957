"""Quickstart on the embedded default: no Redis server, no GPU, nothing downloaded.

Uses the SmolLM2-backed fixture (real text weights, untrained vision tower) in place of a real
LLaVA checkpoint; with your own model, pass its hub name or folder instead.
"""

from guardrail import GuardConfig, GuardedVLM
from guardrail.testing import fixture_path, synthetic_image
from shift_store import open_store

vlm = GuardedVLM.from_pretrained(
    str(fixture_path("smollm")), config=GuardConfig(alpha=1.0), store=open_store(None)
)  # embedded store in the user cache
image = synthetic_image(0)
for mode in ("off", "dataset", "sample"):
    out = vlm.generate("What is in this picture?", [image], mode=mode, max_new_tokens=24)
    print(f"[{out.decision.mode_used}] {out.text}")
    print(f"    decision: guarded={out.decision.guarded} shift_norm={out.decision.shift_norm}")
text = vlm.generate("What is the capital of France?", max_new_tokens=12)
print(f"[{text.decision.mode_used}] {text.text}")
