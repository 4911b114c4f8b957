"""Pictures for ``guardrail eval`` and the demo (matplotlib, installed with the ``plot`` extra)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from guardrail.evaluation.harness import ModeResult, Representation
from guardrail.evaluation.judges import RefusalJudge


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pca(rep: Representation, path: str | Path, title: str = "") -> Path:
    """Scatter of the first two principal components of the final-layer states."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 5))
    for name, colour in (
        ("text-only", "tab:blue"),
        ("multimodal", "tab:red"),
        ("corrected", "tab:green"),
    ):
        points = rep.pca[name]
        label = f"{name} ({rep.corrected_mode})" if name == "corrected" else name
        ax.scatter(
            [p[0] for p in points],
            [p[1] for p in points],
            s=18,
            alpha=0.75,
            color=colour,
            label=label,
        )
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title(title or "Final-layer states at the last prompt token")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_alpha_sweep(results: Sequence[ModeResult], path: str | Path) -> Path:
    """Unsafe rate and utility (share of answers without a refusal phrase) against alpha."""
    plt = _pyplot()
    refusal = RefusalJudge()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for mode in ("dataset", "sample"):
        rows = sorted((r for r in results if r.mode == mode), key=lambda r: r.alpha or 0.0)
        if not rows:
            continue
        alphas = [r.alpha for r in rows]
        left.plot(alphas, [100 * (r.unsafe_rate or 0.0) for r in rows], marker="o", label=mode)
        answered = [
            100 * sum(bool(refusal.judge("", a["answer"]).unsafe) for a in r.answers) / max(r.n, 1)
            for r in rows
        ]
        right.plot(alphas, answered, marker="o", label=mode)
    for r in results:
        if r.mode in ("vlm", "text-only") and r.unsafe_rate is not None:
            left.axhline(
                100 * r.unsafe_rate,
                linestyle="--",
                linewidth=1,
                color="tab:red" if r.mode == "vlm" else "tab:blue",
                label=r.mode,
            )
    left.set(xlabel="alpha", ylabel="unsafe %", title="Unsafe rate")
    right.set(xlabel="alpha", ylabel="answered %", title="Utility: answers without refusal")
    left.legend()
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
