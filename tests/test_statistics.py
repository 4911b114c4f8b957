"""Statistics for clustered, paired evaluations (guardrail.evaluation.statistics)."""

from __future__ import annotations

import pytest

from guardrail.evaluation.statistics import cluster_bootstrap, mcnemar, paired_difference


def test_clustered_outcomes_get_a_wider_interval_than_independent_ones():
    """Ten templates of ten prompts each; half the templates fail every prompt. Resampling
    templates sees five or so clusters' worth of evidence, not a hundred items'."""
    outcomes = [float(t < 5) for t in range(10) for _ in range(10)]
    by_template = [(t,) for t in range(10) for _ in range(10)]
    each_alone = [(i,) for i in range(100)]
    clustered = cluster_bootstrap(outcomes, by_template)
    naive = cluster_bootstrap(outcomes, each_alone)
    assert clustered.value == naive.value == 0.5
    assert (clustered.high - clustered.low) > 2 * (naive.high - naive.low)
    assert 0.15 < clustered.low < 0.35 and 0.65 < clustered.high < 0.85


def test_two_factors_are_resampled_together():
    """Failures tied to topics are found whether items also group by template."""
    outcomes = [float(topic == 0) for template in range(5) for topic in range(4)]
    cells = [(template, topic) for template in range(5) for topic in range(4)]
    both = cluster_bootstrap(outcomes, cells)
    templates_only = cluster_bootstrap(outcomes, [(c[0],) for c in cells])
    assert both.value == 0.25
    assert templates_only.low == templates_only.high == 0.25  # every template alike
    assert both.high - both.low > 0.3  # the topic carries the failures
    assert cluster_bootstrap([1.0, 1.0], [(0,), (1,)]) == cluster_bootstrap(
        [1.0, 1.0], [(0,), (1,)]
    )


def test_mcnemar_counts_only_the_items_two_modes_disagree_on():
    assert mcnemar([False] * 10, [True] * 10) == pytest.approx(2 / 2**10)
    assert mcnemar([True] * 5 + [False] * 5, [False] * 5 + [True] * 5) == 1.0
    same = [True, False, True]
    assert mcnemar(same, same) == 1.0
    with pytest.raises(ValueError):
        mcnemar([True], [True, False])


def test_a_paired_difference_is_equivalent_only_inside_the_margin():
    first = [True] * 20 + [False] * 80
    groups = [(i % 10,) for i in range(100)]
    same = paired_difference(first, first, groups)
    assert same.difference.value == 0 and same.equivalent and same.p_value == 1.0
    worse = paired_difference(first, [True] * 40 + [False] * 60, groups)
    assert worse.difference.value == pytest.approx(0.2) and not worse.equivalent
    assert worse.p_value < 1e-4
