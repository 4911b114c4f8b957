"""The paper's evaluation: unsafe rates per mode, added latency, representation metrics."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import torch
from tqdm.auto import tqdm

from guardrail.calibration import batched
from guardrail.config import Mode
from guardrail.engine import GuardedVLM
from guardrail.evaluation.datasets import EvalSample
from guardrail.evaluation.judges import Judge
from guardrail.requests import GuardRequest

MODES = ("vlm", "text-only", "caption", "dataset", "sample")


def wilson_interval(unsafe: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (sensible at 0 and n, unlike the normal one)."""
    if n == 0:
        return (0.0, 1.0)
    p = unsafe / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass
class ModeResult:
    """Numbers of one mode (and alpha, for the CMRM modes)."""

    mode: str
    alpha: float | None
    n: int = 0
    unsafe: int = 0
    judge_errors: int = 0
    unsafe_rate: float | None = None
    ci95: tuple[float, float] = (0.0, 1.0)
    seconds_per_sample: float = 0.0
    added_latency_ms: float = 0.0
    answers: list[dict[str, Any]] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.mode if self.alpha is None else f"{self.mode} a={self.alpha:g}"


@dataclass
class Representation:
    """Final-layer states at the last prompt token: text-only, multimodal, corrected."""

    distance_multimodal: float
    distance_corrected: float
    separation_multimodal: float
    separation_corrected: float
    corrected_mode: str
    pca: dict[str, list[list[float]]]


def _request(sample: EvalSample, mode: str, alpha: float | None) -> GuardRequest:
    images = [sample.image] if sample.image else []
    if mode == "text-only":
        return GuardRequest(sample.prompt)
    if mode == "caption":
        return GuardRequest(f"{sample.caption or ''}\n{sample.prompt}".strip())
    if mode == "vlm":
        return GuardRequest(sample.prompt, images, mode="off")
    return GuardRequest(sample.prompt, images, mode=cast(Mode, mode), alpha=alpha)


def run_mode(
    vlm: GuardedVLM,
    samples: Sequence[EvalSample],
    judge: Judge,
    mode: str,
    alpha: float | None,
    *,
    batch_size: int,
    max_new_tokens: int,
    progress: bool,
) -> ModeResult:
    """Answer every sample in ``mode`` and judge the answers."""
    result = ModeResult(mode, alpha)
    elapsed = 0.0
    for chunk in tqdm(
        list(batched(samples, batch_size)), desc=result.label, disable=None if progress else True
    ):
        started = time.perf_counter()
        outputs = vlm.generate_batch(
            [_request(s, mode, alpha) for s in chunk], max_new_tokens=max_new_tokens
        )
        elapsed += time.perf_counter() - started
        for sample, output in zip(chunk, outputs, strict=True):
            verdict = judge.judge(sample.prompt, output.text)
            result.n += 1
            result.unsafe += bool(verdict.unsafe)
            result.judge_errors += verdict.unsafe is None
            result.answers.append(
                {
                    "id": sample.id,
                    "answer": output.text,
                    "unsafe": verdict.unsafe,
                    "judge_error": verdict.error,
                    "mode_used": output.decision.mode_used,
                    "layers": list(output.decision.layers),
                }
            )
    judged = result.n - result.judge_errors
    result.unsafe_rate = result.unsafe / judged if judged else None
    result.ci95 = wilson_interval(result.unsafe, judged)
    result.seconds_per_sample = elapsed / max(result.n, 1)
    return result


def _separation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Distance between the two centroids over the mean distance of points to their centroid."""
    spread = ((a - a.mean(0)).norm(dim=1).mean() + (b - b.mean(0)).norm(dim=1).mean()) / 2
    return float((a.mean(0) - b.mean(0)).norm() / spread.clamp_min(1e-9))


def representation(
    vlm: GuardedVLM,
    samples: Sequence[EvalSample],
    corrected_mode: str,
    alpha: float,
    batch_size: int,
) -> Representation:
    """How far multimodal states are from text-only ones, before and after the correction."""
    with_image = [s for s in samples if s.image]
    states: dict[str, list[torch.Tensor]] = {"text-only": [], "multimodal": [], "corrected": []}
    for chunk in batched(with_image, batch_size):
        states["text-only"].append(vlm.final_states([GuardRequest(s.prompt) for s in chunk]))
        states["multimodal"].append(vlm.final_states([_request(s, "vlm", None) for s in chunk]))
        states["corrected"].append(
            vlm.final_states([_request(s, corrected_mode, alpha) for s in chunk])
        )
    text, multi, corr = (torch.cat(states[k]) for k in ("text-only", "multimodal", "corrected"))
    stacked = torch.cat([text, multi, corr])
    centred = stacked - stacked.mean(0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    points = (centred @ v[:2].T).tolist()
    n = len(text)
    return Representation(
        distance_multimodal=float((multi - text).norm(dim=1).mean()),
        distance_corrected=float((corr - text).norm(dim=1).mean()),
        separation_multimodal=_separation(text, multi),
        separation_corrected=_separation(text, corr),
        corrected_mode=f"{corrected_mode} a={alpha:g}",
        pca={
            "text-only": points[:n],
            "multimodal": points[n : 2 * n],
            "corrected": points[2 * n :],
        },
    )


def evaluate(
    vlm: GuardedVLM,
    samples: Sequence[EvalSample],
    judge: Judge,
    *,
    modes: Sequence[str] = MODES,
    alphas: Sequence[float] = (1.0,),
    batch_size: int = 8,
    max_new_tokens: int = 64,
    progress: bool = True,
) -> tuple[list[ModeResult], Representation | None]:
    """Run every mode (CMRM modes once per alpha), then the representation metrics."""
    unknown = set(modes) - set(MODES)
    if unknown:
        raise ValueError(f"unknown modes {sorted(unknown)}; choose from {MODES}")
    if samples:  # warm-up, so that the first mode timed does not pay for it
        vlm.generate_batch([_request(samples[0], "vlm", None)], max_new_tokens=2)
    results = []
    for mode in modes:
        for alpha in alphas if mode in ("dataset", "sample") else [None]:
            results.append(
                run_mode(
                    vlm,
                    samples,
                    judge,
                    mode,
                    alpha,
                    batch_size=batch_size,
                    max_new_tokens=max_new_tokens,
                    progress=progress,
                )
            )
    baseline = next((r for r in results if r.mode == "vlm"), None)
    for r in results:
        if baseline is not None:
            r.added_latency_ms = (r.seconds_per_sample - baseline.seconds_per_sample) * 1e3
    cmrm = [m for m in ("dataset", "sample") if m in modes]
    rep = None
    if cmrm and any(s.image for s in samples):
        rep = representation(vlm, samples, cmrm[0], alphas[0], batch_size)
    return results, rep


def table(results: Sequence[ModeResult], rep: Representation | None) -> str:
    """A plain-text table shaped like the paper's."""
    lines = [
        f"{'mode':16} {'unsafe %':>9} {'95% CI':>15} {'n':>5} {'judge err':>9} {'+latency ms':>12}"
    ]
    for r in results:
        rate = "-" if r.unsafe_rate is None else f"{100 * r.unsafe_rate:.1f}"
        ci = f"[{100 * r.ci95[0]:.1f}, {100 * r.ci95[1]:.1f}]"
        lines.append(
            f"{r.label:16} {rate:>9} {ci:>15} {r.n:>5} {r.judge_errors:>9} "
            f"{r.added_latency_ms:>12.1f}"
        )
    if rep is not None:
        lines.append("")
        lines.append(
            f"final-layer distance to text-only: multimodal {rep.distance_multimodal:.2f}"
            f", corrected ({rep.corrected_mode}) {rep.distance_corrected:.2f}"
        )
        lines.append(
            f"cluster separation from text-only: multimodal "
            f"{rep.separation_multimodal:.2f}, corrected {rep.separation_corrected:.2f}"
        )
    return "\n".join(lines)


def as_json(results: Sequence[ModeResult], rep: Representation | None) -> dict[str, Any]:
    return {
        "modes": [asdict(r) | {"label": r.label} for r in results],
        "representation": None if rep is None else asdict(rep),
    }
