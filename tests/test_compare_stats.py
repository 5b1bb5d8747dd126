"""The study statistics on synthetic results with known answers."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from resstream.compare.stats import (
    compare_to_baseline,
    holm,
    paired_difference,
    summarize,
    verdict,
)


def test_summary_matches_the_t_interval_by_hand():
    values = [2.70, 2.75, 2.71]
    summary = summarize(values)
    mean = sum(values) / 3
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / 2)
    half = 4.302652729911275 * std / math.sqrt(3)  # t_{0.975, 2}
    assert summary.mean == pytest.approx(mean)
    assert summary.std == pytest.approx(std)
    assert summary.ci95 == pytest.approx((mean - half, mean + half))


def test_one_seed_has_no_interval_and_cannot_tell():
    assert summarize([2.7]).ci95 is None
    difference = paired_difference([2.8], [2.7])
    assert difference.ci95 is None and difference.p_value is None
    assert verdict(difference) == "cannot tell (one seed)"


def test_paired_test_equals_scipy_ttest_rel():
    rng = np.random.default_rng(1)
    base = rng.normal(2.7, 0.05, 5)
    variant = base + rng.normal(0.02, 0.01, 5)
    ours = paired_difference(list(variant), list(base))
    reference = scipy_stats.ttest_rel(variant, base)
    assert ours.p_value == pytest.approx(reference.pvalue, rel=1e-9)
    assert ours.mean == pytest.approx(float(np.mean(variant - base)))


def test_pairing_removes_the_seed_effect():
    """Seeds move every variant together by a lot; the variant is 0.01 worse at every seed.
    Paired, that is unmistakable; unpaired it would drown in the seed spread."""
    seed_effect = [0.0, 0.3, -0.2, 0.15]
    base = [2.7 + s for s in seed_effect]
    variant = [b + 0.01 + 1e-4 * i for i, b in enumerate(base)]
    difference = paired_difference(variant, base)
    assert difference.p_value < 1e-4
    assert scipy_stats.ttest_ind(variant, base).pvalue > 0.5


def test_known_difference_is_significant_and_null_is_not():
    rng = np.random.default_rng(0)
    base = list(2.7 + rng.normal(0, 0.02, 3))
    finals = {"base": base,
              "worse": [b + 0.15 + e for b, e in zip(base, rng.normal(0, 0.005, 3))],
              "same": [b + e for b, e in zip(base, rng.normal(0, 0.005, 3))]}
    result = compare_to_baseline(finals, "base")
    assert result["worse"].significant and verdict(result["worse"]) == "significantly worse"
    assert not result["same"].significant
    assert verdict(result["same"]) == "no significant difference"
    assert set(result) == {"worse", "same"}


def test_identical_runs_give_p_one_and_constant_shift_p_zero():
    assert paired_difference([2.7, 2.8, 2.9], [2.7, 2.8, 2.9]).p_value == 1.0
    shifted = paired_difference([2.75, 2.85, 2.95], [2.7, 2.8, 2.9])
    assert shifted.p_value < 1e-9 and shifted.mean == pytest.approx(0.05)
    exact = paired_difference([0.75, 1.75, 2.75], [0.5, 1.5, 2.5])  # representable: no spread
    assert exact.p_value == 0.0


def test_holm_by_hand():
    adjusted = holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": None})
    # sorted 0.01, 0.03, 0.04 with m = 3: 0.03, max(0.03, 0.06) = 0.06, max(0.06, 0.04) = 0.06
    assert adjusted["a"] == (pytest.approx(0.03), True)
    assert adjusted["c"] == (pytest.approx(0.06), False)
    assert adjusted["b"] == (pytest.approx(0.06), False)
    assert "d" not in adjusted


def test_holm_controls_family_wise_error_under_the_null():
    """Five null variants, 3 seeds, 2000 simulated studies: the chance of any false positive
    stays at or below alpha (uncorrected it would be about 1 - 0.95^5 = 23%)."""
    rng = np.random.default_rng(3)
    any_false, any_uncorrected = 0, 0
    studies = 2000
    for _ in range(studies):
        base = list(rng.normal(2.7, 0.02, 3))
        finals = {"base": base, **{f"v{i}": list(np.array(base) + rng.normal(0, 0.01, 3))
                                   for i in range(5)}}
        result = compare_to_baseline(finals, "base")
        any_false += any(d.significant for d in result.values())
        any_uncorrected += any(d.p_value < 0.05 for d in result.values())
    assert any_false / studies <= 0.05 + 0.015
    assert any_uncorrected / studies > 0.15


@pytest.mark.parametrize("n", [3, 5])
def test_interval_covers_the_true_mean_at_the_nominal_rate(n):
    rng = np.random.default_rng(n)
    trials, true_mean = 4000, 2.7
    covered = 0
    for _ in range(trials):
        low, high = summarize(list(rng.normal(true_mean, 0.05, n))).ci95
        covered += low <= true_mean <= high
    rate = covered / trials
    assert abs(rate - 0.95) < 0.015, rate


def test_paired_interval_covers_the_true_difference():
    rng = np.random.default_rng(7)
    trials, covered = 3000, 0
    for _ in range(trials):
        base = rng.normal(2.7, 0.1, 3)
        variant = base + 0.03 + rng.normal(0, 0.01, 3)
        low, high = paired_difference(list(variant), list(base)).ci95
        covered += low <= 0.03 <= high
    assert abs(covered / trials - 0.95) < 0.015
