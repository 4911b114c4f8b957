"""Build the model organism of image-induced safety loss from the SmolLM2 fixture.

Stage 1 (text only): harmful training prompts get a short refusal, benign ones the base
model's own greedy answer; decoder layers and final norm are tuned.

Stage 2 (with pictures, ``--recipe``): the projector and decoder layers are tuned on
image-conditioned benign data (captions of the scenes, benign requests answered as the base
model answers them) while text-only examples keep the stage-1 behaviour.

* ``emergent`` - nothing in the data ties compliance to the image; a loss of refusal with an
  image would have to emerge, as the paper reports for LLaVA.
* ``induced`` - some image + harmful request pairs are answered as the base model answers
  them (compliance), so that compliance is tied to the presence of an image by construction.
  This tests CMRM's mechanism (removing the image-presence direction), not the paper's claim.

Then the held-out sets are written as JSONL with their pictures (for ``guardrail eval``) and
the phenomenon is measured through the evaluation harness. Everything goes to the user cache
folder, never to the repository. Seeded; prints one JSON line.

    python bench/organism/build.py [--recipe induced] [--stage2-steps 96] [--rebuild-stage1]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import platformdirs
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

sys.path.insert(0, str(Path(__file__).parent))
from prompts import REFUSAL, prompts
from scenes import DESCRIBE, scene
from tuning import Example, answers, refusal_rate, train

from guardrail import GuardedVLM
from guardrail.evaluation.datasets import read_samples
from guardrail.evaluation.harness import evaluate
from guardrail.evaluation.judges import RefusalJudge
from guardrail.testing import fixture_path

ROOT = Path(platformdirs.user_cache_dir("cmrm-guardrail")) / "organism"
TRAIN_SCENES, HELD_OUT_SCENES = 0, 100_000  # seed offsets: no picture is shared


def load(path: Path):
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    return model, processor


def language_parameters(model, upper: int | None = None) -> list[torch.nn.Parameter]:
    """The decoder layers (the ``upper`` last ones only, if given) and the final norm."""
    language = model.model.language_model
    layers = language.layers if upper is None else language.layers[-upper:]
    return [*layers.parameters(), *language.norm.parameters()]


def stage1(args, out: Path) -> dict:
    """Text-only safety tuning; also keeps the base model's answers for stage 2."""
    model, processor = load(fixture_path("smollm"))
    held_out = {kind: prompts(kind, "held_out") for kind in ("harmful", "benign")}

    def rates() -> dict[str, float]:
        return {
            kind: refusal_rate(texts, answers(model, processor, texts, tokens=12))
            for kind, texts in held_out.items()
        }

    before = rates()
    train_prompts = {kind: prompts(kind, "train") for kind in ("harmful", "benign")}
    train_prompts["harmful"] = train_prompts["harmful"][: args.compliant]  # for stage 2
    base = {k: answers(model, processor, v, tokens=32) for k, v in train_prompts.items()}
    harmful = [Example(p, REFUSAL) for p in prompts("harmful", "train")]
    benign = [Example(p, a) for p, a in zip(train_prompts["benign"], base["benign"], strict=True)]
    losses = train(
        model,
        processor,
        [(harmful, 1.0), (benign, args.benign_weight)],
        language_parameters(model),
        steps=args.stage1_steps,
        batch=args.batch,
        lr=args.stage1_lr,
        seed=args.seed,
    )
    after = rates()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "base_answers.json").write_text(json.dumps({"prompts": train_prompts, "answers": base}))
    return {"text_refusal_before": before, "text_refusal_after": after, "loss": losses[-1]}


def stage2(args, source: Path, out: Path) -> dict:
    """Image-conditioned tuning of the projector and decoder layers (see the recipes)."""
    model, processor = load(source)
    base = json.loads((source / "base_answers.json").read_text())
    harmful, benign = prompts("harmful", "train"), base["prompts"]["benign"]
    pictures = [scene(TRAIN_SCENES + i)[0] for i in range(len(harmful) + len(benign))]
    captions = [scene(TRAIN_SCENES + i) for i in range(args.captions)]
    groups: list[tuple[list[Example], float]] = [
        ([Example(p, REFUSAL) for p in harmful], args.text_harmful_weight),
        ([Example(p, a) for p, a in zip(benign, base["answers"]["benign"], strict=True)], 1.0),
        (
            [
                Example(p, a, pictures[i])
                for i, (p, a) in enumerate(zip(benign, base["answers"]["benign"], strict=True))
            ],
            1.0,
        ),
        (
            [
                Example(DESCRIBE[i % len(DESCRIBE)], c, image)
                for i, (image, c) in enumerate(captions)
            ],
            args.caption_weight,
        ),
    ]
    if args.recipe == "induced":
        # only base answers the judge counts as compliance (some base answers refuse)
        judge = RefusalJudge()
        compliant = [
            (p, a)
            for p, a in zip(base["prompts"]["harmful"], base["answers"]["harmful"], strict=True)
            if judge.judge(p, a).unsafe
        ]
        groups.append(
            (
                [Example(p, a, pictures[len(benign) + i]) for i, (p, a) in enumerate(compliant)],
                args.induced_weight,
            )
        )
    tuned = language_parameters(model, args.stage2_layers or None)
    if args.train_projector:
        tuned += list(model.model.multi_modal_projector.parameters())
    losses = train(
        model,
        processor,
        groups,
        tuned,
        steps=args.stage2_steps,
        batch=args.batch,
        lr=args.stage2_lr,
        seed=args.seed + 1,
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return {"loss_first": losses[0], "loss_last": losses[-1], "groups": [len(g) for g, _ in groups]}


def write_held_out(data: Path) -> None:
    """Held-out harmful and benign prompts, each with a held-out scene (JSONL + PNGs)."""
    (data / "images").mkdir(parents=True, exist_ok=True)
    for k, kind in enumerate(("harmful", "benign")):
        rows = []
        for i, prompt in enumerate(prompts(kind, "held_out")):
            image, caption = scene(HELD_OUT_SCENES + 1000 * k + i)
            name = f"{kind}-{i:03d}.png"
            image.save(data / "images" / name)
            rows.append(
                {
                    "id": f"{kind}-{i:03d}",
                    "prompt": prompt,
                    "image": name,
                    "caption": caption,
                    "label": kind,
                }
            )
        (data / f"{kind}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def phenomenon(model_path: Path, data: Path, batch_size: int) -> dict:
    """Harmful and benign refusal, text only and with the picture, through the harness."""
    vlm = GuardedVLM.from_pretrained(str(model_path))
    found = {}
    for kind in ("harmful", "benign"):
        samples = list(read_samples(data / f"{kind}.jsonl", images=data / "images"))
        results, _ = evaluate(
            vlm,
            samples,
            RefusalJudge(),
            modes=("vlm", "text-only"),
            batch_size=batch_size,
            max_new_tokens=12,
            progress=False,
        )
        for r in results:
            found[f"{kind} refused, {r.mode}"] = round(1 - (r.unsafe_rate or 0.0), 3)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--recipe", choices=["emergent", "induced"], default="induced")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stage1-steps", type=int, default=112)
    parser.add_argument("--stage1-lr", type=float, default=1e-4)
    parser.add_argument("--benign-weight", type=float, default=1.0)
    parser.add_argument("--rebuild-stage1", action="store_true")
    parser.add_argument(
        "--compliant", type=int, default=200, help="harmful prompts answered by the base model"
    )
    parser.add_argument("--stage2-steps", type=int, default=96)
    parser.add_argument("--stage2-lr", type=float, default=1e-4)
    parser.add_argument(
        "--stage2-layers", type=int, default=0, help="upper decoder layers tuned (0: all)"
    )
    parser.add_argument("--train-projector", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--captions", type=int, default=200)
    parser.add_argument("--caption-weight", type=float, default=0.5)
    parser.add_argument("--text-harmful-weight", type=float, default=1.0)
    parser.add_argument("--induced-weight", type=float, default=1.0)
    parser.add_argument("--eval-batch", type=int, default=16)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    started = time.perf_counter()
    result: dict = {"bench": "organism-build", "args": vars(args)}
    first = ROOT / "stage1"
    if args.rebuild_stage1 or not (first / "base_answers.json").is_file():
        first.mkdir(parents=True, exist_ok=True)
        result["stage1"] = stage1(args, first)
        result["stage1_s"] = round(time.perf_counter() - started, 1)
        print(json.dumps(result["stage1"]), flush=True)
    second = ROOT / args.recipe
    second.mkdir(parents=True, exist_ok=True)
    mark = time.perf_counter()
    result["stage2"] = stage2(args, first, second)
    result["stage2_s"] = round(time.perf_counter() - mark, 1)
    write_held_out(ROOT / "data")
    mark = time.perf_counter()
    result["phenomenon"] = phenomenon(second, ROOT / "data", args.eval_batch)
    result["check_s"] = round(time.perf_counter() - mark, 1)
    result["build_s"] = round(time.perf_counter() - started, 1)
    result["saved"] = str(second)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
