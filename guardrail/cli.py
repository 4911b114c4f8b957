"""The ``guardrail`` command: ``demo`` (runs anywhere, offline) and ``chat``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path

import torch

from guardrail.anchors import BUNDLED_ANCHORS
from guardrail.config import GuardConfig
from guardrail.config_flags import add_guard_flags, guard_config
from guardrail.decision import GuardDecision
from guardrail.engine import GuardedVLM
from guardrail.errors import GuardrailError
from guardrail.evaluation.datasets import DataReport, EvalSample, Format, read_samples
from guardrail.families import FAMILIES
from guardrail.requests import GuardRequest
from guardrail.version import __version__
from shift_store import ShiftKey, ShiftVector, StoreError, open_store

COMMANDS_GROUP = "cmrm_guardrail.commands"

UNTRAINED_NOTICE = (
    "NOTE: the demo model is SmolLM2-135M-Instruct behind an UNTRAINED, random vision tower.\n"
    "It shows the cross-modal representation shift and its correction; it is not a safety\n"
    "benchmark (SmolLM2 never refuses, and the vision tower sees nothing in the images)."
)


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    p, q = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1)


def _summary(decision: GuardDecision) -> str:
    """One short line of a decision: mode, α, shift."""
    if not decision.guarded:
        return f"{decision.mode_used}, unguarded ({decision.reason})"
    shift = f"|Δ| {decision.shift_norm:.1f}" if decision.shift_norm is not None else "no shift"
    return f"{decision.mode_used}, alpha {decision.alpha:g}, layers {decision.layers}, {shift}"


def demo(args: argparse.Namespace) -> int:
    """Build the SmolLM2 fixture (cached), calibrate, answer with and without the guard. On a
    terminal each call gets a short line; the JSON decision lines are for logs."""
    terminal = sys.stdout.isatty()
    decisions = logging.getLogger("guardrail.decisions")
    level = decisions.level
    if terminal:
        decisions.setLevel(logging.ERROR)
    try:
        return _demo(args, terminal)
    finally:
        decisions.setLevel(level)


def _demo(args: argparse.Namespace, terminal: bool) -> int:
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
    print(
        f"dataset-level shift ({shift.meta.anchor_name}, {shift.meta.anchor_size} anchors) "
        f"from {store!r}; per-layer norms:\n  {norms}"
    )
    print(
        f"edited layer(s): {list(vlm.layers)}, positions: "
        f"{vlm.config.positions}, alpha: {vlm.config.alpha}\n"
    )

    questions = anchor_prompts()[: args.prompts]
    images = [synthetic_image(i) for i in range(len(questions))]
    text_logits, _ = vlm.next_token_logits([GuardRequest(q) for q in questions])
    for mode in ("off", "dataset", "sample"):
        requests = [
            GuardRequest(q, [img], mode=mode) for q, img in zip(questions, images, strict=True)
        ]
        logits, _ = vlm.next_token_logits(requests)
        outputs = vlm.generate_batch(requests, max_new_tokens=args.max_new_tokens)
        print(
            f"=== mode={mode}: mean KL(next token | text-only || this) = "
            f"{float(_kl(text_logits, logits).mean()):.3f}"
        )
        for question, out in zip(questions, outputs, strict=True):
            print(f"Q: {question}\nA: {out.text}")
            if terminal:
                print(f"   guard: {_summary(out.decision)}")
            else:
                print(f"   decision: {out.decision.model_dump_json(include=_SHOWN)}")
        print()
    from guardrail.evaluation.datasets import EvalSample
    from guardrail.evaluation.harness import representation

    folder = Path(args.plot).resolve().parent
    samples = []
    for i, question in enumerate(anchor_prompts()[1::2]):
        path = folder / f".cmrm-demo-{i}.png"
        synthetic_image(i).save(path)
        samples.append(EvalSample(str(i), question, path))
    try:
        rep = representation(vlm, samples, "dataset", vlm.config.alpha, batch_size=8)
    finally:
        for sample in samples:
            if sample.image is not None:
                sample.image.unlink(missing_ok=True)
    print(
        f"final-layer distance to text-only: multimodal {rep.distance_multimodal:.1f}, "
        f"corrected {rep.distance_corrected:.1f}; cluster separation: "
        f"{rep.separation_multimodal:.2f} -> {rep.separation_corrected:.2f}"
    )
    from guardrail.evaluation.plots import plot_pca

    print(f"wrote {plot_pca(rep, args.plot, 'SmolLM2 fixture (untrained vision tower)')}\n")
    print(UNTRAINED_NOTICE)
    return 0


_SHOWN = {
    "mode_used",
    "guarded",
    "alpha",
    "layers",
    "shift_level",
    "shift_norm",
    "added_latency_ms",
    "fallbacks",
}


def _requests(
    path: str,
    data_format: Format,
    images: str | None,
    mapping: str | None,
    skip_bad: bool,
    report: DataReport,
) -> list[EvalSample]:
    samples = list(
        read_samples(
            path, data_format, images=images, mapping=mapping, skip_bad=skip_bad, report=report
        )
    )
    if report.skipped:
        print(f"skipped {report.skipped} bad row(s); first: {report.reasons[0]}", file=sys.stderr)
    return samples


def calibrate(args: argparse.Namespace) -> int:
    """Compute the dataset-level shift of a model on an anchor file and store it."""
    report = DataReport()
    samples = _requests(args.anchor, args.format, args.images, args.mapping, args.skip_bad, report)
    config = guard_config(args)
    vlm = GuardedVLM.from_pretrained(
        args.model, config=config, family=args.family, device=args.device, dtype=args.dtype
    )
    store = open_store(args.store, namespace=args.app)
    name = args.anchor_name or Path(args.anchor).stem
    requests = [GuardRequest(s.prompt, [s.image] if s.image else []) for s in samples]
    started = time.perf_counter()
    shift = vlm.compute_dataset_shift(
        requests, batch_size=args.batch_size, anchor_name=name, activate=False
    )
    key = ShiftKey.for_meta(shift.meta)
    norms = " ".join(f"{n:.1f}" for n in shift.norms.tolist())
    print(
        f"model {vlm.fingerprint.name_or_path} ({vlm.fingerprint.id}); {shift.meta.anchor_size} "
        f"anchors ({report.skipped} skipped) in {time.perf_counter() - started:.1f} s"
    )
    print(f"calibration {shift.meta.calibration_id} (pin it with --shift-calibration-id)")
    if args.save:
        Path(args.save).write_bytes(shift.to_bytes())
        print(f"saved to {args.save}")
    try:
        version = store.put(key, shift)  # only a complete vector is ever written
    except StoreError as e:
        kept = Path(args.save or f"cmrm-shift-{shift.meta.calibration_id}.safetensors")
        kept.write_bytes(shift.to_bytes())
        print(
            f"error: {type(e).__name__}: {e}\nthe shift is kept in {kept}; store it with "
            f"`guardrail store-put {kept} --store URL --app {args.app}`",
            file=sys.stderr,
        )
        return 3
    print(f"stored under {key.name} in {store!r}, version {version[:12]}")
    print(f"per-layer |shift|: {norms}")
    print(f"anchor-distance threshold: {shift.meta.anchor_distance_threshold or 0:.3f}")
    return 0


def store_put(args: argparse.Namespace) -> int:
    """Store a shift saved by ``guardrail calibrate`` (for example while the store was down)."""
    shift = ShiftVector.from_bytes(Path(args.file).read_bytes())
    key = ShiftKey.for_meta(shift.meta)
    version = open_store(args.store, namespace=args.app).put(key, shift)
    print(f"stored calibration {shift.meta.calibration_id} under {key.name}")
    print(f"version {version[:12]}")
    return 0


def evaluate_command(args: argparse.Namespace) -> int:
    """The paper's evaluation table, JSON and plots."""
    from guardrail.evaluation.harness import as_json, evaluate, table
    from guardrail.evaluation.judges import make_judge

    report = DataReport()
    samples = _requests(args.data, args.format, args.images, args.mapping, args.skip_bad, report)
    config = guard_config(args)
    vlm = GuardedVLM.from_pretrained(
        args.model, config=config, family=args.family, device=args.device, dtype=args.dtype
    )
    modes = args.modes.split(",")
    if "dataset" in modes:
        lookup = vlm.use_store(
            open_store(args.store, namespace=args.app),
            anchor_name=args.anchor_name or BUNDLED_ANCHORS,
        )
        if lookup.vector is None:
            raise GuardrailError(f"no dataset-level shift: {lookup.note}; run guardrail calibrate")
    judge = make_judge(args.judge, cache_dir=args.judge_cache)
    results, rep = evaluate(
        vlm,
        samples,
        judge,
        modes=modes,
        alphas=args.alpha,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
    )
    print(table(results, rep))
    print(f"judge: {judge.name}; {len(samples)} samples, {report.skipped} skipped")
    if args.json:
        payload = as_json(results, rep) | {
            "judge": judge.name,
            "skipped": report.skipped,
            "config": config.model_dump(mode="json"),
        }
        Path(args.json).write_text(json.dumps(payload, indent=2))
    if args.plot:
        from guardrail.evaluation.plots import plot_alpha_sweep, plot_pca

        if rep is not None:
            print(f"wrote {plot_pca(rep, args.plot)}")
        if len(args.alpha) > 1:
            sweep = Path(args.plot).with_name(Path(args.plot).stem + "-alpha.png")
            print(f"wrote {plot_alpha_sweep(results, sweep)}")
    return 0


def chat(args: argparse.Namespace) -> int:
    """One guarded answer and its decision."""
    config = guard_config(args, GuardConfig(mode="sample"))
    vlm = GuardedVLM.from_pretrained(
        args.model, config=config, family=args.family, device=args.device
    )
    out = vlm.generate(args.prompt, args.image, max_new_tokens=args.max_new_tokens)
    print(out.text)
    print(out.decision.model_dump_json(indent=2), file=sys.stderr)
    return 0


def _data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--format", default="jsonl", choices=["jsonl", "vlsafe", "jailbreakllms", "llava-bench"]
    )
    p.add_argument("--images", help="folder the image names are relative to")
    p.add_argument("--mapping", help="JSON {q_id: image file} for the JailbreakLLMs CSV")
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) malformed rows")


def _model_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="hub name or local folder")
    p.add_argument(
        "--family",
        default=None,
        choices=[family.name for family in FAMILIES],
        help="model family (default: found from the checkpoint's model_type)",
    )


def _model_options(p: argparse.ArgumentParser) -> None:
    _model_option(p)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, help="for example bfloat16")
    p.add_argument("--store", default=None, help="shift store URL (default: embedded folder)")
    p.add_argument("--app", default="default", help="store namespace")
    p.add_argument("--batch-size", type=int, default=8)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="guardrail", description=__doc__)
    parser.add_argument("--version", action="version", version=f"cmrm-guardrail {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("calibrate", help="compute and store a dataset-level shift")
    _model_options(p)
    _data_options(p)
    p.add_argument("--anchor", required=True, help="anchor data file")
    p.add_argument("--anchor-name", default=None, help="store key name (default: file stem)")
    p.add_argument("--save", default=None, help="also write the shift to this file")
    add_guard_flags(p, aliases={"corruption.seed": "--seed"})
    p.set_defaults(func=calibrate)
    p = commands.add_parser("store-put", help="store a shift file that calibrate saved")
    p.add_argument("file")
    p.add_argument("--store", default=None, help="shift store URL (default: embedded folder)")
    p.add_argument("--app", default="default", help="store namespace")
    p.set_defaults(func=store_put)
    p = commands.add_parser("eval", help="unsafe rates per mode, like the paper")
    _model_options(p)
    _data_options(p)
    p.add_argument("--data", required=True)
    p.add_argument("--modes", default="vlm,text-only,caption,dataset,sample")
    p.add_argument("--alpha", type=float, nargs="+", default=[1.0])
    p.add_argument("--anchor-name", default=None, help="dataset shift to use (store key name)")
    add_guard_flags(p, skip={"alpha"}, aliases={"corruption.seed": "--seed"})
    p.add_argument("--judge", default="refusal", help="refusal | http | hf:MODEL")
    p.add_argument("--judge-cache", default=None, help="folder caching http judge answers")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--json", help="write all numbers here")
    p.add_argument("--plot", help="PCA picture (PNG); with several --alpha also an alpha sweep")
    p.set_defaults(func=evaluate_command)
    p = commands.add_parser("demo", help="offline demo on the embedded SmolLM2 fixture")
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--store", default=None, help="shift store URL (default: embedded folder)")
    p.add_argument("--plot", default="cmrm-demo-pca.png", help="where to write the PCA picture")
    p.set_defaults(func=demo)
    p = commands.add_parser("chat", help="one guarded answer plus its decision")
    _model_option(p)
    p.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    add_guard_flags(p)  # --mode defaults to sample here
    p.add_argument("--device", default=None)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("prompt")
    p.set_defaults(func=chat)
    for command in entry_points(group=COMMANDS_GROUP):  # front ends add theirs (serve)
        command.load()(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        return int(args.func(args))
    except (GuardrailError, StoreError, ValueError) as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
