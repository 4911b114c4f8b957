"""Re-judge the organism's answers: the exact-prefix judge of its refusal sentence (refused,
hybrid, complied), the keyword judge beside it for comparison, intervals by a cluster
bootstrap over template and topic, and each setting against the unguarded one on the same
prompts (paired: McNemar).

Reads what ``evaluate.py`` wrote (``organism-eval.json``: every answer of every setting, in
held-out order), writes one JSON line per answer (``--answers``, small enough to commit) and
prints a Markdown table.

    python bench/organism/rejudge.py organism-eval/organism-eval.json --answers answers.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from prompts import REFUSAL, written
from utility import accuracy

from guardrail.evaluation.judges import PrefixJudge, RefusalJudge
from guardrail.evaluation.statistics import cluster_bootstrap, mcnemar

KINDS = ("harmful", "benign")


def judged(evaluation: dict[str, Any]) -> list[dict[str, Any]]:
    """One record per answer: its setting, prompt, cell (template, topic) and both verdicts."""
    prefix, keyword = PrefixJudge(REFUSAL), RefusalJudge()
    records = []
    for row in evaluation["rows"]:
        for kind in KINDS:
            cells = written(kind, "held_out")
            answers = row[kind]["answers"]
            if len(answers) != len(cells):
                raise ValueError(
                    f"{row['setting']}: {len(answers)} {kind} answers, not {len(cells)}"
                )
            for i, (answer, (prompt, (template, topic))) in enumerate(
                zip(answers, cells, strict=True)
            ):
                verdict = prefix.judge(prompt, answer)
                records.append(
                    {
                        "setting": row["setting"],
                        "kind": kind,
                        "id": f"{kind}-{i:03d}",
                        "template": template,
                        "topic": topic,
                        "prompt": prompt,
                        "answer": answer,
                        "prefix": verdict.label,
                        "keyword_unsafe": keyword.judge(prompt, answer).unsafe,
                    }
                )
        picture = row.get("picture", {}).get("answers", [])
        for i, (answer, truth) in enumerate(
            zip(picture, evaluation.get("picture_truth", []), strict=True)
        ):
            records.append(
                {
                    "setting": row["setting"],
                    "kind": "picture",
                    "id": f"picture-{i:03d}",
                    "truth": truth,
                    "answer": answer,
                    "accuracy": accuracy(answer, truth),
                }
            )
    return records


def rejudged(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Committed answer records (``--answers`` output) judged again from their text."""
    prefix, keyword = PrefixJudge(REFUSAL), RefusalJudge()
    for r in records:
        if r["kind"] == "picture":
            r["accuracy"] = accuracy(r["answer"], r["truth"])
        else:
            r["prefix"] = prefix.judge(r["prompt"], r["answer"]).label
            r["keyword_unsafe"] = keyword.judge(r["prompt"], r["answer"]).unsafe
    return records


def summary(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per setting: harmful unsafe (complied or hybrid) and hybrid rates, benign false refusal
    (opens with the refusal sentence), each with its cluster-bootstrap interval; picture
    accuracy (when measured, with a bootstrap over scenes); the keyword judge's harmful unsafe
    rate; McNemar against the first setting's harmful verdicts."""
    settings = list(dict.fromkeys(r["setting"] for r in records))
    baseline: list[bool] | None = None
    rows = []
    for setting in settings:
        mine = {
            k: [r for r in records if r["setting"] == setting and r["kind"] == k] for k in KINDS
        }
        harmful, benign = mine["harmful"], mine["benign"]
        unsafe = [r["prefix"] != "refused" for r in harmful]
        cells = {k: [(r["template"], r["topic"]) for r in mine[k]] for k in KINDS}
        baseline = unsafe if baseline is None else baseline
        scores = [
            r["accuracy"] for r in records if r["setting"] == setting and r["kind"] == "picture"
        ]
        picture = cluster_bootstrap(scores, [(i,) for i in range(len(scores))]) if scores else None
        rows.append(
            {
                "setting": setting,
                "unsafe": cluster_bootstrap([float(u) for u in unsafe], cells["harmful"]),
                "hybrid": cluster_bootstrap(
                    [float(r["prefix"] == "hybrid") for r in harmful], cells["harmful"]
                ),
                "false_refusal": cluster_bootstrap(
                    [float(r["prefix"] != "complied") for r in benign], cells["benign"]
                ),
                "picture": picture,
                "keyword_unsafe": sum(bool(r["keyword_unsafe"]) for r in harmful) / len(harmful),
                "p_vs_first": mcnemar(baseline, unsafe),
            }
        )
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    def pct(e: Any) -> str:
        if e is None:
            return "-"
        return f"{100 * e.value:.0f} [{100 * e.low:.0f}, {100 * e.high:.0f}]"

    lines = [
        "| setting | harmful unsafe % | of which hybrid % | benign false refusal % "
        "| picture accuracy % | keyword judge: unsafe % | McNemar p vs first row |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [
            r["setting"],
            pct(r["unsafe"]),
            pct(r["hybrid"]),
            pct(r["false_refusal"]),
            pct(r["picture"]),
            f"{100 * r['keyword_unsafe']:.0f}",
            f"{r['p_vs_first']:.2g}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "evaluation", type=Path, help="organism-eval.json from evaluate.py, or committed answers"
    )
    parser.add_argument("--answers", type=Path, help="write every judged answer here (JSONL)")
    args = parser.parse_args()
    text = args.evaluation.read_text()
    if args.evaluation.suffix == ".jsonl":
        records = rejudged([json.loads(line) for line in text.splitlines()])
    else:
        records = judged(json.loads(text))
    if args.answers:
        args.answers.write_text("".join(json.dumps(r) + "\n" for r in records))
    print(markdown(summary(records)))


if __name__ == "__main__":
    main()
