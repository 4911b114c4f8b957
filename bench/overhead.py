"""End-to-end ``generate`` latency with and without CMRM, as ratios to unguarded in the same run.

Variants, each forced to exactly N new tokens:
* ``unguarded``       - mode off;
* ``dataset``         - dataset-level shift (one subtraction per edited layer and step);
* ``sample-3gen``     - three sequential generation passes (text-only, with the blank image,
                        guarded): the cost of getting a per-token reference the naive way;
* ``sample-3pass``    - two prefill-only reference passes, then generation with that fixed
                        prompt shift (cheaper, but the prompt shift does not fit generated
                        tokens: see docs/defaults.md);
* ``sample-untrimmed`` - lockstep with the reference rows run through every layer and the LM head
                        (``trim_references=False``), to show what trimming saves;
* ``sample-lockstep`` - this project's sample level: the two reference rows ride in the same
                        batched pass, are fed each generated token, and stop after the deepest
                        edited layer.
With ``--tools``, a tools row per fixture and mode: a call whose answer must be a tool call
(constrained decoding, ``guardrail.constraints``) against the same call unconstrained, forced to
the same number of new tokens (a grammar that has ended allows nothing but a stop token, so the
constrained call cannot be forced to N tokens like the variants above).
Ratios are paired: each repeat's time over the unguarded time of the same repeat (variants run
interleaved), which cancels slow drift of a shared machine. Prints a table (median and min-max
over repeats) and a final JSON line. Peak memory is not measured here on CPU; see RESULTS.md.

    python bench/overhead.py [--fixtures tiny smollm] [--tokens 32 128] [--batch 1 8]
                             [--repeats 3] [--variants ...] [--tools]
                             [--model PATH --device cuda --dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time

import torch

from guardrail import GuardConfig, GuardedVLM, GuardRequest
from guardrail.constraints import OutputConstraint
from guardrail.images import corruption_image
from guardrail.testing import anchor_prompts, fixture_path, function_tool, synthetic_image

VARIANTS = (
    "unguarded",
    "dataset",
    "sample-3gen",
    "sample-3pass",
    "sample-untrimmed",
    "sample-lockstep",
)


def _sync(vlm: GuardedVLM) -> None:
    if vlm.model.device.type == "cuda":
        torch.cuda.synchronize()


def run_variant(vlm: GuardedVLM, variant: str, requests: list[GuardRequest], tokens: int) -> float:
    _sync(vlm)
    started = time.perf_counter()
    if variant == "sample-3gen":
        spec, size = vlm.config.corruption, vlm.backend.default_image_size()
        text = [GuardRequest(r.prompt) for r in requests]
        blank = [
            GuardRequest(r.prompt, [corruption_image(spec, size) for _ in r.images], mode="off")
            for r in requests
        ]
        for references in (text, blank):
            vlm.generate_batch(references, max_new_tokens=tokens, min_new_tokens=tokens)
        requests = [GuardRequest(r.prompt, r.images, mode="dataset") for r in requests]
    elif variant == "sample-3pass":
        requests = [
            GuardRequest(
                r.prompt,
                r.images,
                mode="dataset",
                shift=vlm.compute_sample_shift(r.prompt, r.images),
            )
            for r in requests
        ]
    elif variant == "sample-untrimmed":
        vlm = vlm.with_config(vlm.config.model_copy(update={"trim_references": False}))
        requests = [GuardRequest(r.prompt, r.images, mode="sample") for r in requests]
    else:
        mode = {"unguarded": "off", "dataset": "dataset", "sample-lockstep": "sample"}[variant]
        requests = [GuardRequest(r.prompt, r.images, mode=mode) for r in requests]
    vlm.generate_batch(requests, max_new_tokens=tokens, min_new_tokens=tokens)
    _sync(vlm)
    return time.perf_counter() - started


def measure(
    vlm: GuardedVLM,
    name: str,
    tokens_list: list[int],
    batches: list[int],
    repeats: int,
    variants: tuple[str, ...] = VARIANTS,
) -> list[dict]:
    prompts = anchor_prompts()
    rows = []
    for batch in batches:
        requests = [
            GuardRequest(prompts[i % len(prompts)], [synthetic_image(i)]) for i in range(batch)
        ]
        for tokens in tokens_list:
            for variant in variants:  # warm-up
                run_variant(vlm, variant, requests[:1], 2)
            times = {v: [] for v in variants}
            peaks: dict[str, float] = {}
            for _ in range(repeats):  # interleaved, so drift hits every variant alike
                for variant in variants:
                    if vlm.model.device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    times[variant].append(run_variant(vlm, variant, requests, tokens))
                    if vlm.model.device.type == "cuda":
                        peaks[variant] = torch.cuda.max_memory_allocated() / 2**30
            for variant in variants:  # paired: each repeat against its own unguarded run
                ratios = [
                    t / base for t, base in zip(times[variant], times["unguarded"], strict=True)
                ]
                rows.append(
                    {
                        "fixture": name,
                        "batch": batch,
                        "new_tokens": tokens,
                        "variant": variant,
                        "median_s": round(statistics.median(times[variant]), 4),
                        "ratio": round(statistics.median(ratios), 3),
                        "ratio_min": round(min(ratios), 3),
                        "ratio_max": round(max(ratios), 3),
                        "peak_gib": round(peaks[variant], 3) if peaks else None,
                        "peak_ratio": round(peaks[variant] / peaks["unguarded"], 3)
                        if peaks
                        else None,
                    }
                )
                r = rows[-1]
                print(
                    f"{name:8} b={batch:<2} N={tokens:<4} {variant:16} "
                    f"{r['median_s']:>8.3f}s  x{r['ratio']:.3f} "
                    f"[{r['ratio_min']:.3f}-{r['ratio_max']:.3f}]"
                    + (f"  peak {r['peak_gib']:.2f} GiB x{r['peak_ratio']:.3f}" if peaks else ""),
                    flush=True,
                )
    return rows


TOOLS = [
    function_tool("web_search", "Search the web.", query="string"),
    function_tool("square", "Square an integer.", n="integer"),
]


def measure_tools(vlm: GuardedVLM, name: str, repeats: int) -> list[dict]:
    """Constrained tool call vs the same call unconstrained with as many new tokens."""
    prompt = "Search the web for the tallest building in Oslo."
    started = time.perf_counter()  # first use: the tokenizer's grammar tables and one grammar
    vlm.backend.grammars().compile(OutputConstraint.tool_call(TOOLS))
    setup_s = time.perf_counter() - started
    rows = []
    for mode in ("dataset", "sample"):
        base = GuardRequest(prompt, [synthetic_image(0)], tools=TOOLS, mode=mode)
        constrained = GuardRequest(
            prompt,
            [synthetic_image(0)],
            tools=TOOLS,
            mode=mode,
            constraint=OutputConstraint.tool_call(TOOLS),
        )
        vlm.generate_batch([constrained], max_new_tokens=64)  # warm-up (grammar compiled)
        times: dict[str, list[float]] = {"unconstrained": [], "constrained": []}
        tokens = 0
        for _ in range(repeats):
            _sync(vlm)
            started = time.perf_counter()
            out = vlm.generate_batch([constrained], max_new_tokens=64)[0]
            _sync(vlm)
            times["constrained"].append(time.perf_counter() - started)
            tokens = out.usage.completion_tokens
            started = time.perf_counter()
            vlm.generate_batch([base], max_new_tokens=tokens, min_new_tokens=tokens)
            _sync(vlm)
            times["unconstrained"].append(time.perf_counter() - started)
        ratios = [c / u for c, u in zip(times["constrained"], times["unconstrained"], strict=True)]
        row = {
            "fixture": name,
            "variant": f"tools-constrained-{mode}",
            "new_tokens": tokens,
            "valid_tool_call": bool(out.tool_calls),
            "first_use_setup_s": round(setup_s, 4),
            "median_s": round(statistics.median(times["constrained"]), 4),
            "ratio": round(statistics.median(ratios), 3),
            "ratio_min": round(min(ratios), 3),
            "ratio_max": round(max(ratios), 3),
        }
        rows.append(row)
        print(
            f"{name:8} tools {mode:8} N={tokens:<4} constrained {row['median_s']:.3f}s  "
            f"x{row['ratio']:.3f} [{row['ratio_min']:.3f}-{row['ratio_max']:.3f}] of the same "
            f"call unconstrained  valid call: {row['valid_tool_call']}  "
            f"first-use setup {setup_s:.3f}s",
            flush=True,
        )
    return rows


def main() -> None:
    logging.getLogger("guardrail.decisions").setLevel(logging.ERROR)
    parser = argparse.ArgumentParser()
    parser.add_argument("--fixtures", nargs="*", default=["tiny", "smollm"])
    parser.add_argument("--model", help="a checkpoint folder instead of the fixtures")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--tokens", nargs="*", type=int, default=[32, 128])
    parser.add_argument("--batch", nargs="*", type=int, default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--tools", action="store_true", help="only the tools rows")
    args = parser.parse_args()
    if "unguarded" not in args.variants:
        parser.error("--variants must include unguarded (the baseline)")
    targets = (
        [(args.model, args.model)]
        if args.model
        else [(name, str(fixture_path(name))) for name in args.fixtures]
    )
    rows = []
    for name, path in targets:
        vlm = GuardedVLM.from_pretrained(
            path,
            config=GuardConfig(),
            device=args.device,
            dtype=getattr(torch, args.dtype) if args.dtype else None,
        )
        vlm.compute_dataset_shift(anchor_prompts()[:8], batch_size=8, progress=False)
        if args.tools:
            rows += measure_tools(vlm, name, args.repeats)
        else:
            rows += measure(vlm, name, args.tokens, args.batch, args.repeats, tuple(args.variants))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(
        json.dumps(
            {
                "benchmark": "overhead",
                "device": device,
                "threads": torch.get_num_threads(),
                "rows": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
