"""Is a stored shift vector this model's shift? A check against a live measurement.

Anyone who can write to the shift store can write a well-formed vector: negated, scaled, zeroed,
or another model's relabelled with this model's fingerprint. Before a stored vector is used for
the first time in a process, it is compared, layer by layer, with a reference measured live on a
few bundled anchor prompts (the same measurement as calibration, on fewer prompts): its
direction must agree and its size must be of the same order. Thresholds come from the
measurement in ``bench/RESULTS.md`` (genuine vectors: cosine 0.73 or more, norm ratio 0.58 to
1.04; poisoned ones: cosine near 0 or -1, or norm ratio 0 or 100).

What the guard reads besides the vectors is checked too: a dataset-level entry must carry decode
vectors (else generated tokens would run uncorrected), and its anchor statistics must be of the
live prompts' scale (genuine: anchor std 1.2 to 1.35 times the probes' spread, distance
threshold 1.3 to 1.4 on both fixtures), so an edit that makes every prompt look anchor-like
(std or threshold inflated) is refused.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import torch

from guardrail import calibration
from guardrail.anchors import bundled_anchor_prompts
from guardrail.backends import CapturingBackend
from guardrail.config import CorruptionSpec
from shift_store import Lookup, ShiftVector


@dataclass(frozen=True)
class PlausibilityLimits:
    """``min_cosine`` and ``norm_ratio`` apply at every layer whose reference shift is at least
    ``significant`` of the largest one; elsewhere a vector may be at most ``norm_ratio[1]`` times
    that floor. The reference averages ``anchors`` prompts and ``decode_tokens`` answer tokens."""

    min_cosine: float = 0.5
    norm_ratio: tuple[float, float] = (1 / 3, 3.0)
    significant: float = 0.1
    anchors: int = 4
    decode_tokens: int = 4
    anchor_std_ratio: tuple[float, float] = (0.25, 4.0)
    max_anchor_threshold: float = 4.0


@dataclass(frozen=True)
class _Reference:
    prompt: torch.Tensor  # [layers, hidden] mean shift at the prompt
    decode: torch.Tensor  # [layers, hidden] mean shift at answer tokens
    text_std: torch.Tensor  # [hidden] spread of the probes' final text-only states


class PlausibilityCheck:
    """Compares stored vectors with a live reference (measured once, on first use); verdicts
    are kept per vector, so a vector is judged once per process."""

    def __init__(
        self,
        backend: CapturingBackend,
        corruption: CorruptionSpec,
        limits: PlausibilityLimits = PlausibilityLimits(),
    ) -> None:
        self.backend, self.corruption, self.limits = backend, corruption, limits
        self._reference: _Reference | None = None
        self._verdicts: dict[str, str | None] = {}
        self._lock = threading.Lock()

    def verdict(self, shift: ShiftVector) -> str | None:
        """:meth:`problem`, remembered by the vector's checksum."""
        if shift.checksum not in self._verdicts:
            self._verdicts[shift.checksum] = self.problem(shift)
        return self._verdicts[shift.checksum]

    def vetted(self, lookup: Lookup) -> Lookup:
        """``lookup``, or a miss saying why its vector was refused."""
        problem = None if lookup.vector is None else self.verdict(lookup.vector)
        if problem is None:
            return lookup
        note = f"stored shift refused as implausible: {problem}"
        return Lookup(None, lookup.version, note, lookup.store_down)

    def reference(self) -> _Reference:
        """Live mean shift at the prompt and at answer tokens, and the probes' spread."""
        with self._lock:
            if self._reference is None:
                prompts = bundled_anchor_prompts()[-self.limits.anchors :]
                sums = calibration.dataset_shift_sums(
                    self.backend,
                    self.corruption,
                    prompts,
                    batch_size=len(prompts),
                    decode_tokens=self.limits.decode_tokens,
                    progress=False,
                )
                assert sums.decode is not None
                self._reference = _Reference(
                    (sums.prompt / sums.count).float(),
                    (sums.decode / sums.count).float(),
                    torch.stack(sums.text_sample).std(dim=0),
                )
            return self._reference

    def problem(self, shift: ShiftVector) -> str | None:
        """Why ``shift`` is not plausible for this model, or None when it is."""
        if shift.decode_vectors is None:
            return "no decode vectors: generated tokens would run uncorrected"
        reference = self.reference()
        return (
            _compare("prompt", shift.vectors, reference.prompt, self.limits)
            or _compare("decode", shift.decode_vectors, reference.decode, self.limits)
            or _anchor_problem(shift, reference, self.limits)
        )


_CHECKS: weakref.WeakKeyDictionary[CapturingBackend, dict[str, PlausibilityCheck]] = (
    weakref.WeakKeyDictionary()
)


def plausibility_check(backend: CapturingBackend, corruption: CorruptionSpec) -> PlausibilityCheck:
    """The check of ``backend`` under ``corruption``, shared by every view of that model."""
    with _CHECKS_LOCK:
        checks = _CHECKS.setdefault(backend, {})
        if corruption.tag not in checks:
            checks[corruption.tag] = PlausibilityCheck(backend, corruption)
        return checks[corruption.tag]


_CHECKS_LOCK = threading.Lock()


def _anchor_problem(
    shift: ShiftVector, reference: _Reference, limits: PlausibilityLimits
) -> str | None:
    threshold = shift.meta.anchor_distance_threshold
    if shift.anchor_std is None or threshold is None:
        return None  # no anchor statistics: the anchor-distance policy trusts nothing
    if threshold > limits.max_anchor_threshold:
        return f"anchor-distance threshold {threshold:.3g} > {limits.max_anchor_threshold}"
    live = reference.text_std.clamp_min(1e-6)
    scale = float((shift.anchor_std.clamp_min(1e-6) / live).log().mean().exp())
    low, high = limits.anchor_std_ratio
    if not low <= scale <= high:
        return f"anchor statistics spread {scale:.3g} times the live prompts'"
    return None


def _compare(
    what: str, vectors: torch.Tensor, reference: torch.Tensor, limits: PlausibilityLimits
) -> str | None:
    low, high = limits.norm_ratio
    norms, reference_norms = vectors.norm(dim=-1), reference.norm(dim=-1)
    floor = limits.significant * float(reference_norms.max())
    if floor <= 0:
        return None  # the model shows no shift at all: nothing to compare with
    ratio = norms / reference_norms.clamp_min(floor)
    cosine = torch.nn.functional.cosine_similarity(vectors, reference, dim=-1)
    significant = reference_norms >= floor
    for layer in range(vectors.shape[0]):
        r, c = float(ratio[layer]), float(cosine[layer])
        if r > high or (significant[layer] and r < low):
            return f"{what} shift at layer {layer} is {r:.3g} times the live measurement"
        if significant[layer] and c < limits.min_cosine:
            return f"{what} shift at layer {layer} points elsewhere (cosine {c:.2f} to live)"
    return None
