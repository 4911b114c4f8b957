"""Shift lookup cost: warm (in-process cache hit) and cold (Redis, local folder) for a
LLaVA-7B-sized vector (32 x 4096 float32), as p50/p99 and as a fraction of one decode step of the
tiny and SmolLM2 fixtures measured in the same run. Prints a table and a final JSON line.

Needs a Redis server at REDIS_URL (default redis://127.0.0.1:6379/0).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
import uuid

import torch

from guardrail import GuardedVLM
from guardrail.requests import render_request
from guardrail.testing import fixture_path, synthetic_image
from shift_store import (
    CachedShiftSource,
    LocalShiftStore,
    ModelFingerprint,
    ShiftKey,
    ShiftMeta,
    ShiftVector,
    open_store,
)


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50_us": ordered[len(ordered) // 2] * 1e6,
        "p99_us": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e6,
    }


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        out.append(time.perf_counter() - started)
    return out


def decode_step_seconds(name: str) -> float:
    """Median time of one greedy decode step (batch 1, with an image in the prompt)."""
    vlm = GuardedVLM.from_pretrained(str(fixture_path(name)))
    image = synthetic_image(0)

    def run(tokens: int) -> float:
        started = time.perf_counter()
        vlm.model.generate(
            **vlm.encode([render_request(_request(image))]),
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            pad_token_id=vlm.tokenizer.pad_token_id,
        )
        return time.perf_counter() - started

    run(2)  # warm up
    steps = [(run(33) - run(1)) / 32 for _ in range(3)]
    return statistics.median(steps)


def _request(image):
    from guardrail import GuardRequest

    return GuardRequest("Describe this picture.", [image])


def main() -> None:
    torch.set_num_threads(2)
    fingerprint = ModelFingerprint(
        name_or_path="llava-7b-shaped",
        weights_hash="w",
        config_hash="c",
        num_layers=32,
        hidden_size=4096,
    )
    meta = ShiftMeta(
        model=fingerprint,
        level="dataset",
        corruption="blank",
        anchor_size=1,
        anchor_name="bench",
        library_version="bench",
    )
    vector = ShiftVector(vectors=torch.randn(32, 4096), meta=meta)
    key = ShiftKey.for_meta(meta)
    redis_store = open_store(
        os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
        + f"?namespace=bench-{uuid.uuid4().hex[:6]}"
    )
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as folder:
        local_store = LocalShiftStore(folder)
        for name, store in (("redis", redis_store), ("local", local_store)):
            store.put(key, vector)
            results[f"cold get ({name})"] = percentiles(timed(lambda s=store: s.get(key), 300))
            results[f"revalidate version ({name})"] = percentiles(
                timed(lambda s=store: s.version(key), 1000)
            )
        source = CachedShiftSource(redis_store, key, revalidate_s=3600)
        source.current()
        results["warm lookup (in-process cache)"] = percentiles(timed(source.current, 20000))
        redis_store.delete(key)

    steps = {name: decode_step_seconds(name) for name in ("tiny", "smollm")}
    print(
        f"{'lookup':34} {'p50 us':>10} {'p99 us':>10} "
        + " ".join(f"{'p50/step ' + n:>16}" for n in steps)
    )
    for what, r in results.items():
        fractions = " ".join(f"{r['p50_us'] / 1e6 / s:>16.2e}" for s in steps.values())
        print(f"{what:34} {r['p50_us']:>10.1f} {r['p99_us']:>10.1f} {fractions}")
    print("decode step: " + ", ".join(f"{n} {s * 1e3:.2f} ms" for n, s in steps.items()))
    print(
        json.dumps(
            {
                "benchmark": "store",
                "vector_shape": [32, 4096],
                "lookups": results,
                "decode_step_ms": {n: s * 1e3 for n, s in steps.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
