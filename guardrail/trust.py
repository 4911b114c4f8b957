"""Trust policies: is this call trusted (dataset-level shift) or untrusted (sample level)?"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import torch

from shift_store import ShiftVector

# Where an image came from: the application, inline data, a remote URL, or a tool's result.
ImageSource = Literal["app", "inline", "remote", "tool"]


@dataclass(frozen=True)
class TrustInput:
    """What a policy may look at: where each image came from, and (lazily, it costs one
    text-only prefill) the final-layer text-only state of the prompt's last token."""

    image_sources: tuple[ImageSource, ...]
    text_state: Callable[[], torch.Tensor]


@dataclass(frozen=True)
class Verdict:
    trusted: bool
    reason: str


@runtime_checkable
class TrustPolicy(Protocol):
    """Classifies one call. Plug in your own by implementing ``classify``."""

    def classify(self, call: TrustInput, anchor: AnchorStats | None) -> Verdict: ...


@dataclass(frozen=True)
class AnchorStats:
    """Per-dimension mean and std of the anchor set's final text-only states, and the distance
    below which a prompt counts as anchor-like."""

    mean: torch.Tensor
    std: torch.Tensor
    threshold: float

    @classmethod
    def of(cls, shift: ShiftVector | None) -> AnchorStats | None:
        """The anchor statistics stored with a dataset-level shift, if it has them (a threshold
        included: without one, nothing counts as anchor-like)."""
        threshold = None if shift is None else shift.meta.anchor_distance_threshold
        if shift is None or shift.anchor_mean is None or shift.anchor_std is None:
            return None
        if threshold is None:
            return None
        return cls(shift.anchor_mean, shift.anchor_std, threshold)

    def distance(self, state: torch.Tensor) -> float:
        """Root mean square z-score of ``state`` against the anchors."""
        z = (state.float().cpu() - self.mean) / self.std
        return float(z.square().mean().sqrt())


def calibrate_threshold(
    mean: torch.Tensor, std: torch.Tensor, sample: list[torch.Tensor], quantile: float = 0.99
) -> float:
    """The ``quantile`` of the anchors' own distances (a sample of them)."""
    stats = AnchorStats(mean, std, 0.0)
    distances = torch.tensor([stats.distance(s) for s in sample])
    return float(torch.quantile(distances, quantile))


class AlwaysTrusted:
    def classify(self, call: TrustInput, anchor: AnchorStats | None) -> Verdict:
        return Verdict(True, "policy: always trusted")


class AlwaysUntrusted:
    def classify(self, call: TrustInput, anchor: AnchorStats | None) -> Verdict:
        return Verdict(False, "policy: always untrusted")


class ByImageSource:
    """Trusted only when every image came from a trusted source (default: supplied by the app
    itself or inline data; remote URLs and images returned by tools are untrusted)."""

    def __init__(self, trusted_sources: tuple[ImageSource, ...] = ("app", "inline")) -> None:
        self.trusted_sources = set(trusted_sources)

    def classify(self, call: TrustInput, anchor: AnchorStats | None) -> Verdict:
        untrusted = sorted(set(call.image_sources) - self.trusted_sources)
        if untrusted:
            return Verdict(False, f"image source {', '.join(untrusted)} is untrusted")
        return Verdict(True, "all images from trusted sources")


class AnchorDistance:
    """Untrusted when the prompt's text-only representation lies beyond the calibrated
    distance from the anchor set (the dataset-level shift may not fit it)."""

    def __init__(self, threshold: float | None = None) -> None:
        self.threshold = threshold

    def classify(self, call: TrustInput, anchor: AnchorStats | None) -> Verdict:
        if anchor is None:
            return Verdict(False, "no anchor statistics: untrusted")
        threshold = self.threshold if self.threshold is not None else anchor.threshold
        distance = anchor.distance(call.text_state())
        if distance > threshold:
            return Verdict(False, f"anchor distance {distance:.2f} > {threshold:.2f}")
        return Verdict(True, f"anchor distance {distance:.2f} <= {threshold:.2f}")


POLICIES: dict[str, Callable[[], TrustPolicy]] = {
    "always-trusted": AlwaysTrusted,
    "always-untrusted": AlwaysUntrusted,
    "image-source": ByImageSource,
    "anchor-distance": AnchorDistance,
}
