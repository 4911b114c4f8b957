"""n choices sharing one prefill, against the same choices as separate calls (SmolLM2 fixture,
CPU, sample level: three rows per choice).

Per answer length: the wall time of one call with ``n`` choices, and of ``n`` calls of one
choice queued together (one batch, every request prefilled with its reference rows), the
rows each prefill ran, and the ratio. The choices' answers are checked equal (choice ``i``
samples as a call with ``seed + i``). Prints a table and a final JSON line.
"""

from __future__ import annotations

import json
import statistics
import time

import torch

from guardrail import GuardRequest
from guardrail.backends import Sampling
from guardrail.service import AppSpec, Call, GuardService
from guardrail.testing import fixture_path, synthetic_image

CHOICES = 4
REPEATS = 5


def main() -> None:
    torch.set_num_threads(2)
    service = GuardService.from_pretrained(str(fixture_path("smollm")))
    service.add_app(AppSpec(name="bench"))
    request = GuardRequest("Describe this picture in detail.", [synthetic_image(3, (336, 336))])
    rows: list[int] = []

    def count(module, args, kwargs):
        ids = kwargs.get("input_ids")
        rows.append(0 if ids is None else int(ids.shape[0]))

    service.model.model.register_forward_pre_hook(count, with_kwargs=True)

    def call(tokens: int, n: int, seed: int) -> Call:
        sampling = Sampling(
            max_new_tokens=tokens, min_new_tokens=tokens, temperature=0.8, seed=seed
        )
        return Call("bench", request, sampling, trust="untrusted", n=n)

    def shared(tokens: int) -> tuple[float, list[list[int]], int]:
        rows.clear()
        started = time.perf_counter()
        output = service.submit(call(tokens, CHOICES, 7)).result()
        return time.perf_counter() - started, [c.token_ids for c in output.choices], rows[0]

    def separate(tokens: int) -> tuple[float, list[list[int]], int]:
        rows.clear()
        started = time.perf_counter()
        handles = [service.submit(call(tokens, 1, 7 + i)) for i in range(CHOICES)]
        outputs = [h.result() for h in handles]
        return time.perf_counter() - started, [o.token_ids for o in outputs], rows[0]

    shared(1), separate(1)  # warm-up
    results = []
    for tokens in (1, 16):
        times: dict[str, list[float]] = {"shared": [], "separate": []}
        first_rows = {}
        for _ in range(REPEATS):
            for name, run in (("shared", shared), ("separate", separate)):
                seconds, answers, prefill_rows = run(tokens)
                times[name].append(seconds)
                first_rows[name] = prefill_rows
                if name == "shared":
                    expected = answers
                else:
                    assert answers == expected, "a shared choice differs from its seeded call"
        shared_s, separate_s = (statistics.median(times[k]) for k in ("shared", "separate"))
        row = {
            "answer_tokens": tokens,
            "choices": CHOICES,
            "shared_s": round(shared_s, 3),
            "separate_s": round(separate_s, 3),
            "shared_over_separate": round(shared_s / separate_s, 3),
            "first_pass_rows_shared": first_rows["shared"],
            "first_pass_rows_separate": first_rows["separate"],
        }
        results.append(row)
        print(
            f"{tokens:>2} tokens: n={CHOICES} in one call {shared_s:.3f} s "
            f"({first_rows['shared']} rows prefilled), as {CHOICES} calls {separate_s:.3f} s "
            f"(first pass {first_rows['separate']} rows): ratio {shared_s / separate_s:.2f}",
            flush=True,
        )
    print(json.dumps({"bench": "choices", "repeats": REPEATS, "rows": results}))


if __name__ == "__main__":
    main()
