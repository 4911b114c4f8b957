"""The ``guardrail`` command: ``demo`` (runs anywhere, offline) and ``chat``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import torch

from guardrail.config import GuardConfig
from guardrail.engine import GuardedVLM
from guardrail.errors import GuardrailError
from guardrail.prompts import GuardRequest
from shift_store import open_store

UNTRAINED_NOTICE = (
    "NOTE: the demo model is SmolLM2-135M-Instruct behind an UNTRAINED, random vision tower.\n"
    "It shows the cross-modal representation shift and its correction; it is not a safety\n"
    "benchmark (SmolLM2 never refuses, and the vision tower sees nothing in the images)."
)


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    p, q = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1)


def demo(args: argparse.Namespace) -> int:
    """Build the SmolLM2 fixture (cached), calibrate, answer with and without the guard."""
    from guardrail.testing import anchor_prompts, fixture_path, synthetic_image

    print(UNTRAINED_NOTICE, "\n")
    print("Loading the SmolLM2-backed LLaVA fixture (built once, then cached)...")
    vlm = GuardedVLM.from_pretrained(str(fixture_path("smollm")), config=GuardConfig())
    store = open_store(args.store)
    lookup = vlm.use_store(store)  # embedded default: a folder in the user cache directory
    shift = lookup.vector
    if shift is None:
        raise GuardrailError(f"no dataset-level shift: {lookup.note}")
    norms = ", ".join(f"{n:.0f}" for n in shift.norms.tolist())
    print(f"dataset-level shift ({shift.meta.anchor_name}, {shift.meta.anchor_size} anchors) "
          f"from {store!r}; per-layer norms:\n  {norms}")
    print(f"edited layer(s): {vlm.layer_indices(vlm.config)}, positions: "
          f"{vlm.config.positions}, alpha: {vlm.config.alpha}\n")

    questions = anchor_prompts()[: args.prompts]
    images = [synthetic_image(i) for i in range(len(questions))]
    text_logits, _ = vlm.next_token_logits([GuardRequest(q) for q in questions])
    for mode in ("off", "dataset", "sample"):
        requests = [GuardRequest(q, [img], mode=mode) for q, img in zip(questions, images,
                                                                        strict=True)]
        logits, _ = vlm.next_token_logits(requests)
        outputs = vlm.generate_batch(requests, max_new_tokens=args.max_new_tokens)
        print(f"=== mode={mode}: mean KL(next token | text-only || this) = "
              f"{float(_kl(text_logits, logits).mean()):.3f}")
        for question, out in zip(questions, outputs, strict=True):
            print(f"Q: {question}\nA: {out.text}")
            print(f"   decision: {out.decision.model_dump_json(include=_SHOWN)}")
        print()
    print(UNTRAINED_NOTICE)
    return 0


_SHOWN = {"mode_used", "guarded", "alpha", "layers", "shift_level", "shift_norm",
          "added_latency_ms", "fallbacks"}


def chat(args: argparse.Namespace) -> int:
    """One guarded answer and its decision."""
    config = GuardConfig(alpha=args.alpha, mode=args.mode)
    vlm = GuardedVLM.from_pretrained(args.model, config=config, device=args.device)
    out = vlm.generate(args.prompt, args.image, max_new_tokens=args.max_new_tokens)
    print(out.text)
    print(out.decision.model_dump_json(indent=2), file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="guardrail", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("demo", help="offline demo on the embedded SmolLM2 fixture")
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--store", default=None, help="shift store URL (default: embedded folder)")
    p.set_defaults(func=demo)
    p = commands.add_parser("chat", help="one guarded answer plus its decision")
    p.add_argument("--model", required=True, help="hub name or local folder")
    p.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--mode", default="sample", choices=["auto", "dataset", "sample", "off"])
    p.add_argument("--device", default=None)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("prompt")
    p.set_defaults(func=chat)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        return args.func(args)
    except GuardrailError as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
