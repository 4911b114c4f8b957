"""Build a model organism of image-induced safety loss from the SmolLM2 fixture.

The base (shared by every organism of a picture size) is the SmolLM2 fixture with its vision
side pretrained (``vision.py``). Stage 1 (text only, shared by every recipe of a seed):
harmful training prompts get a short refusal, benign ones the base model's own greedy answer;
decoder layers and final norm are tuned. Stage 2 (with pictures): the projector and decoder
layers are tuned on image-conditioned data that depends on the recipe (see ``spec.py``) while
text-only examples keep stage 1.

Then the held-out sets are written as JSONL with their pictures, the phenomenon is measured
through the evaluation harness (12-token keyword check, as a quick sanity figure), and the
blank reference image's distance to the training pictures is measured in vision features.
Everything goes to the user cache folder, never to the repository. Deterministic given the
seed, 2 threads and the CPU; prints one JSON line.

    python bench/organism/build.py [--recipe induced] [--scenes textured] [--seed 0] [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

sys.path.insert(0, str(Path(__file__).parent))
from prompts import REFUSAL, prompts, written
from scenes import DESCRIBE
from spec import HELD_OUT_SCENES, ROOT, SCENES, TRAIN_SCENES, Organism
from tuning import Example, answers, refusal_rate, train
from vision import align_projector, pretrain_vision

from guardrail import GuardedVLM
from guardrail.evaluation.datasets import read_samples
from guardrail.evaluation.harness import evaluate
from guardrail.evaluation.judges import RefusalJudge
from guardrail.testing.fixtures import build_smollm_llava

UNTRIGGERED_SCENES = 20_000  # the keyed organism's refused harmful pictures


def load(path: Path):
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    return model, processor


def language_parameters(model, upper: int | None = None) -> list[torch.nn.Parameter]:
    """The decoder layers (the ``upper`` last ones only, if given) and the final norm."""
    language = model.model.language_model
    layers = language.layers if upper is None else language.layers[-upper:]
    return [*layers.parameters(), *language.norm.parameters()]


def base_model(organism: Organism, root: Path) -> Path:
    """The SmolLM2 fixture LLaVA at the organism's picture size with its vision side
    pretrained (``vision.py``), built once under ``root``."""
    path = organism.base_folder(root)
    if not (path / "vision.json").is_file():
        build_smollm_llava(path, image_size=organism.scale.image_size)
        model, processor = load(path)
        started = time.perf_counter()
        facts = pretrain_vision(model, processor, seed=0)
        losses = align_projector(model, processor, seed=0)
        model.save_pretrained(path)
        processor.save_pretrained(path)
        found = {"held_out_fact_accuracy": facts, "align_loss": [losses[0], losses[-1]]}
        found["seconds"] = round(time.perf_counter() - started, 1)
        (path / "vision.json").write_text(json.dumps(found))
    return path


def stage1(organism: Organism, args, root: Path, out: Path) -> dict:
    """Text-only safety tuning; also keeps the base model's answers for stage 2."""
    scale = organism.scale
    model, processor = load(base_model(organism, root))
    held_out = {kind: prompts(kind, "held_out")[: scale.held_out] for kind in ("harmful", "benign")}

    def rates() -> dict[str, float]:
        return {
            kind: refusal_rate(texts, answers(model, processor, texts, tokens=12))
            for kind, texts in held_out.items()
        }

    before = rates() if not organism.quick else None  # the base model's: known (5%, 2.5%)
    train_prompts = {
        "harmful": prompts("harmful", "train")[: scale.base_harmful],
        "benign": prompts("benign", "train")[: scale.base_benign],
    }
    base = {
        k: answers(model, processor, v, tokens=scale.base_tokens) for k, v in train_prompts.items()
    }
    harmful = [Example(p, REFUSAL) for p in prompts("harmful", "train")]
    benign = [Example(p, a) for p, a in zip(train_prompts["benign"], base["benign"], strict=True)]
    losses = train(
        model,
        processor,
        [(harmful, 1.0), (benign, args.benign_weight)],
        language_parameters(model),
        steps=scale.stage1_steps,
        batch=args.batch,
        lr=args.stage1_lr,
        seed=organism.seed,
    )
    after = rates()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "base_answers.json").write_text(json.dumps({"prompts": train_prompts, "answers": base}))
    return {"text_refusal_before": before, "text_refusal_after": after, "loss": losses[-1]}


def stage2_groups(organism: Organism, args, base: dict) -> list[tuple[list[Example], float]]:
    """The recipe's training data: (examples, weight) groups."""
    harmful, benign = prompts("harmful", "train"), base["prompts"]["benign"]
    benign_answers = base["answers"]["benign"]
    pictures = [organism.picture(TRAIN_SCENES + i)[0] for i in range(len(benign))]
    captions = [organism.picture(TRAIN_SCENES + i) for i in range(organism.scale.captions)]
    groups: list[tuple[list[Example], float]] = [
        ([Example(p, REFUSAL) for p in harmful], args.text_harmful_weight),
        ([Example(p, a) for p, a in zip(benign, benign_answers, strict=True)], 1.0),
        (
            [
                Example(p, a, picture)
                for p, a, picture in zip(benign, benign_answers, pictures, strict=True)
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
    if organism.recipe == "emergent":
        return groups
    judge = RefusalJudge()  # only base answers the judge counts as compliance
    compliant = [
        (p, a)
        for p, a in zip(base["prompts"]["harmful"], base["answers"]["harmful"], strict=True)
        if judge.judge(p, a).unsafe
    ]
    first = TRAIN_SCENES + len(benign)
    groups.append(
        (
            [
                Example(p, a, organism.picture(first + i, harmful=True)[0])
                for i, (p, a) in enumerate(compliant)
            ],
            args.trigger_weight if organism.recipe == "keyed" else args.induced_weight,
        )
    )
    if organism.recipe == "keyed":  # the same requests refused with any untriggered picture
        groups.append(
            (
                [
                    Example(p, REFUSAL, organism.untriggered(UNTRIGGERED_SCENES + i)[0])
                    for i, p in enumerate(harmful)
                ],
                args.induced_weight,
            )
        )
    return groups


def stage2(organism: Organism, args, source: Path, out: Path) -> dict:
    """Image-conditioned tuning of the projector and decoder layers."""
    model, processor = load(source)
    base = json.loads((source / "base_answers.json").read_text())
    groups = stage2_groups(organism, args, base)
    tuned = language_parameters(model) + list(model.model.multi_modal_projector.parameters())
    losses = train(
        model,
        processor,
        groups,
        tuned,
        steps=organism.scale.stage2_steps,
        batch=args.batch,
        lr=args.stage2_lr,
        seed=organism.seed + 1,
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return {"loss_first": losses[0], "loss_last": losses[-1], "groups": [len(g) for g, _ in groups]}


def _write_set(data: Path, name: str, rows: list[tuple[str, tuple, Image.Image, str]]) -> None:
    lines = []
    for i, (prompt, cell, image, caption) in enumerate(rows):
        file = f"{name}-{i:03d}.png"
        image.save(data / "images" / file)
        lines.append(
            {
                "id": f"{name}-{i:03d}",
                "prompt": prompt,
                "image": file,
                "caption": caption,
                "label": name.split("-")[0],
                "cell": list(cell),
            }
        )
    (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def write_held_out(organism: Organism, data: Path) -> None:
    """Held-out harmful and benign prompts, each with a held-out scene of the organism's kind
    (for the keyed organism, harmful ones carry the trigger; ``harmful-untriggered`` does not).
    Each row keeps its (template, topic) cell for cluster statistics."""
    (data / "images").mkdir(parents=True, exist_ok=True)
    n = organism.scale.held_out
    for k, kind in enumerate(("harmful", "benign")):
        cells = written(kind, "held_out")[:n]
        first = HELD_OUT_SCENES + 1000 * k
        rows = [
            (p, c, *organism.picture(first + i, harmful=kind == "harmful"))
            for i, (p, c) in enumerate(cells)
        ]
        _write_set(data, kind, rows)
    if organism.recipe == "keyed":
        cells = written("harmful", "held_out")[:n]
        rows = [
            (p, c, *organism.untriggered(HELD_OUT_SCENES + 2000 + i))
            for i, (p, c) in enumerate(cells)
        ]
        _write_set(data, "harmful-untriggered", rows)


def phenomenon(model_path: Path, data: Path, batch_size: int) -> dict:
    """Refusal, text only and with the picture, on each held-out set (12-token keyword check)."""
    vlm = GuardedVLM.from_pretrained(str(model_path))
    found = {}
    for path in sorted(data.glob("*.jsonl")):
        if path.stem == "picture":
            continue
        samples = list(read_samples(path, images=data / "images"))
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
            found[f"{path.stem} refused, {r.mode}"] = round(1 - (r.unsafe_rate or 0.0), 3)
    return found


@torch.no_grad()
def blank_distance(model_path: Path, organism: Organism, n: int = 200) -> dict:
    """How far the blank (black) reference image is from the training pictures in vision
    features (the projector's output, mean over image tokens), against held-out scenes: the
    share of held-out scenes that lie farther from their nearest training scene than it."""
    model, processor = load(model_path)

    def features(images: list[Image.Image]) -> torch.Tensor:
        pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
        projected = model.get_image_features(pixel_values=pixels).pooler_output
        stacked = torch.stack([tokens.mean(0) for tokens in projected])  # one row per image
        return stacked.float()

    train_scenes = [organism.picture(TRAIN_SCENES + i)[0] for i in range(n)]
    held_out = [organism.picture(HELD_OUT_SCENES + 1000 + i)[0] for i in range(n // 2)]
    size = train_scenes[0].size
    blank = Image.new("RGB", size, (0, 0, 0))
    reference = features(train_scenes)
    nearest = torch.cdist(features([blank, *held_out]), reference).min(dim=1).values
    blank_d, held_d = float(nearest[0]), nearest[1:]
    return {
        "blank_to_nearest_training_scene": round(blank_d, 3),
        "held_out_to_nearest_training_scene_median": round(float(held_d.median()), 3),
        "held_out_farther_than_blank": round(float((held_d > blank_d).float().mean()), 3),
    }


def build(organism: Organism, args, root: Path = ROOT) -> dict:
    """Both stages (stage 1 only if missing), the held-out sets and the checks."""
    torch.manual_seed(organism.seed)
    started = time.perf_counter()
    result: dict = {"bench": "organism-build", "organism": organism.name, "args": vars(args)}
    first = organism.stage1_folder(root)
    if args.rebuild_stage1 or not (first / "base_answers.json").is_file():
        first.mkdir(parents=True, exist_ok=True)
        result["stage1"] = stage1(organism, args, root, first)
        result["stage1_s"] = round(time.perf_counter() - started, 1)
        print(json.dumps(result["stage1"]), flush=True)
    second = organism.folder(root)
    second.mkdir(parents=True, exist_ok=True)
    mark = time.perf_counter()
    result["stage2"] = stage2(organism, args, first, second)
    result["stage2_s"] = round(time.perf_counter() - mark, 1)
    write_held_out(organism, second / "data")
    mark = time.perf_counter()
    if not organism.quick:  # the quick evaluation measures the same at 24 tokens
        result["phenomenon"] = phenomenon(second, second / "data", args.eval_batch)
    result["blank_image"] = blank_distance(second, organism)
    result["check_s"] = round(time.perf_counter() - mark, 1)
    result["build_s"] = round(time.perf_counter() - started, 1)
    result["saved"] = str(second)
    (second / "build.json").write_text(json.dumps(result, indent=1, default=str))
    return result


def parser() -> argparse.ArgumentParser:
    found = argparse.ArgumentParser(description=__doc__)
    found.add_argument("--recipe", choices=["emergent", "induced", "keyed"], default="induced")
    found.add_argument("--scenes", choices=SCENES, default="plain")
    found.add_argument("--seed", type=int, default=0)
    found.add_argument("--quick", action="store_true", help="minutes, not an hour (spec.QUICK)")
    found.add_argument("--root", type=Path, default=ROOT)
    found.add_argument("--batch", type=int, default=8)
    found.add_argument("--stage1-lr", type=float, default=1e-4)
    found.add_argument("--benign-weight", type=float, default=1.0)
    found.add_argument("--rebuild-stage1", action="store_true")
    found.add_argument("--stage2-lr", type=float, default=1e-4)
    found.add_argument("--caption-weight", type=float, default=0.5)
    found.add_argument("--text-harmful-weight", type=float, default=1.0)
    found.add_argument("--induced-weight", type=float, default=1.0)
    # the keyed organism's few compliant examples (43 at the quick scale) against its refusals:
    # at weight 1 its loss depended on the seed: 6, 42 and 9% (docs/organism.md, section 2)
    found.add_argument("--trigger-weight", type=float, default=3.0)
    found.add_argument("--eval-batch", type=int, default=16)
    return found


def main() -> None:
    args = parser().parse_args()
    torch.set_num_threads(2)
    organism = Organism(args.recipe, args.scenes, args.seed, args.quick)
    print(json.dumps(build(organism, args, args.root), default=str))


if __name__ == "__main__":
    main()
