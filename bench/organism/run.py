"""Rebuild and measure the model organisms with one command: build (``build.py``), evaluate
(``evaluate.py``) and tabulate each organism and seed, then the spread over seeds.

``--quick`` builds the quick induced organism on textured scenes (seed 0) at the quick scale
(``spec.QUICK``): on 2 cores from nothing, 11 minutes on one machine and 31 on another (CPUs
differ), of which 5 and 12.5 build the pretrained vision side (shared by every organism of a
picture size); stage 1 is shared by every recipe of a seed, and another organism of a seed
takes 4-6 minutes on the first. It is what the test suite runs. Without it, every organism of
``--organisms`` at every seed of ``--seeds`` at full scale (hours).
Deterministic given the seeds, 2 threads and the CPU (two CPUs gave different builds).
Writes ``run.json`` to ``--out``.

    python bench/organism/run.py --quick [--organisms induced-plain induced-textured]
    python bench/organism/run.py --organisms induced-textured keyed-textured --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.metadata
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from build import build
from build import parser as build_parser
from evaluate import evaluate_organism
from rejudge import markdown, spread, spread_markdown
from spec import ROOT, Organism

QUICK = ("induced-textured",)
FULL = ("induced-textured", "keyed-textured", "emergent-textured")


def _plain(value: Any) -> Any:
    """JSON for what ``json`` does not know: dataclasses as dicts, anything else as text."""
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else str(value)


def provenance(organism: Organism, root: Path) -> dict[str, Any]:
    """What the answers came from: the model's SHA-256, package versions, threads."""
    folder = organism.folder(root)
    return {
        "organism": organism.name,
        "model_sha256": {
            p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.glob("*.safetensors"))
        },
        "packages": {
            name: importlib.metadata.version(name)
            for name in ("torch", "transformers", "tokenizers", "safetensors", "pillow")
        },
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "machine": f"{os.cpu_count()} cores, {platform.machine()}",
    }


def organism_of(name: str, seed: int, quick: bool) -> Organism:
    recipe, scenes = name.split("-")
    return Organism(recipe, scenes, seed, quick)


def run(names: list[str], seeds: list[int], quick: bool, root: Path, out: Path) -> dict:
    """Build and evaluate every organism at every seed; returns their tables and spreads."""
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"bench": "organism-run", "quick": quick, "organisms": {}}
    for name in names:
        tables = []
        for seed in seeds:
            organism = organism_of(name, seed, quick)
            started = time.perf_counter()
            built = build(organism, build_parser().parse_args([]), root)
            evaluated = evaluate_organism(organism, root, out / organism.name)
            meta = provenance(organism, root)
            (out / organism.name / "meta.json").write_text(json.dumps(meta, indent=1))
            tables.append(evaluated["table"])
            print(f"## {organism.name}\n\n{markdown(evaluated['table'])}\n", flush=True)
            result["organisms"][organism.name] = {
                "build": built,
                "evaluation": evaluated,
                "seconds": round(time.perf_counter() - started, 1),
            }
        if len(seeds) > 1:
            rows = spread(tables)
            result["organisms"][f"{name} spread"] = rows
            print(spread_markdown(rows, len(seeds)), flush=True)
    (out / "run.json").write_text(json.dumps(result, indent=1, default=_plain))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--organisms", nargs="+", default=None, help="recipe-scenes names")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--root", type=Path, default=ROOT)
    parser.add_argument("--out", type=Path, default=Path("organism-run"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    names = args.organisms or list(QUICK if args.quick else FULL)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    run(names, seeds, args.quick, args.root, args.out)


if __name__ == "__main__":
    main()
