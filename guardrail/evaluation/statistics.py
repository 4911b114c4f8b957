"""Statistics for evaluations whose items are not independent: prompts written from templates
and topics share errors, and modes compared on the same prompts are paired.

* :func:`cluster_bootstrap` - an interval for a rate by resampling every grouping factor
  (template, topic) at once, Owen's pigeonhole bootstrap: each replicate draws each factor's
  levels with replacement and weights an item by the product of its levels' draws.
* :func:`mcnemar` - the exact McNemar test of two modes on the same items.
* :func:`paired_difference` - the difference of two modes' rates on the same items, with a
  cluster-bootstrap interval, and whether it lies within an equivalence margin.
"""

from __future__ import annotations

import math
import random
from collections.abc import Hashable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Estimate:
    """A rate (or a difference of rates) and its bootstrap interval."""

    value: float
    low: float
    high: float


def cluster_bootstrap(
    outcomes: Sequence[float],
    groups: Sequence[Sequence[Hashable]],
    *,
    replicates: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> Estimate:
    """The mean of ``outcomes`` (0/1 or any values) with a percentile interval from a bootstrap
    that resamples each grouping factor: ``groups[i]`` holds item ``i``'s level of every factor
    (say ``(template, topic)``). One factor per item is a plain cluster bootstrap."""
    if not outcomes or len(outcomes) != len(groups):
        raise ValueError("one group tuple per outcome, and at least one outcome")
    factors = len(groups[0])
    levels = [sorted({g[f] for g in groups}, key=repr) for f in range(factors)]
    rng = random.Random(seed)
    means = []
    for _ in range(replicates):
        draws = []
        for names in levels:
            counts: dict[Hashable, int] = {}
            for _ in names:
                picked = names[rng.randrange(len(names))]
                counts[picked] = counts.get(picked, 0) + 1
            draws.append(counts)
        weights = [math.prod(draws[f].get(g[f], 0) for f in range(factors)) for g in groups]
        total = sum(weights)
        if total:
            means.append(sum(w * y for w, y in zip(weights, outcomes, strict=True)) / total)
    means.sort()
    tail = (1 - level) / 2
    low = means[int(tail * (len(means) - 1))]
    high = means[math.ceil((1 - tail) * (len(means) - 1))]
    return Estimate(sum(outcomes) / len(outcomes), low, high)


def mcnemar(first: Sequence[bool], second: Sequence[bool]) -> float:
    """Two-sided exact McNemar p-value that two modes, judged on the same items, have the
    same rate (only the items they disagree on count)."""
    if len(first) != len(second):
        raise ValueError("the two modes must be judged on the same items")
    only_first = sum(a and not b for a, b in zip(first, second, strict=True))
    only_second = sum(b and not a for a, b in zip(first, second, strict=True))
    n = only_first + only_second
    if n == 0:
        return 1.0
    tail: float = sum(math.comb(n, k) for k in range(min(only_first, only_second) + 1)) / 2**n
    return min(1.0, 2 * tail)


@dataclass(frozen=True)
class PairedDifference:
    """``second``'s rate minus ``first``'s on the same items, its interval, the McNemar
    p-value, and whether the interval lies within ``±margin`` (equivalent)."""

    difference: Estimate
    p_value: float
    margin: float

    @property
    def equivalent(self) -> bool:
        return -self.margin < self.difference.low and self.difference.high < self.margin


def paired_difference(
    first: Sequence[bool],
    second: Sequence[bool],
    groups: Sequence[Sequence[Hashable]],
    *,
    margin: float = 0.05,
    replicates: int = 2000,
    seed: int = 0,
) -> PairedDifference:
    """Compare two modes judged on the same items (see :class:`PairedDifference`)."""
    deltas = [float(b) - float(a) for a, b in zip(first, second, strict=True)]
    estimate = cluster_bootstrap(deltas, groups, replicates=replicates, seed=seed)
    return PairedDifference(estimate, mcnemar(first, second), margin)
