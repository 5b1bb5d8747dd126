"""Statistics of a study: per-variant means with Student-t confidence intervals over seeds, the
paired difference to the baseline (same seed, same data order), and Holm's correction across
variants.

* Mean and 95% CI of a variant's final validation bpb over n seeds:
  mean +- t_{0.975, n-1} * s / sqrt(n), s the sample standard deviation.
* Paired difference to the baseline: d_i = variant_i - baseline_i for each seed i; mean and CI
  as above, and the two-sided p-value of the paired t-test, t = mean(d) / (s_d / sqrt(n)) with
  n - 1 degrees of freedom.
* Holm-Bonferroni across the m non-baseline variants: sort the p-values p_(1) <= ... <= p_(m);
  adjusted p_(j) = max_{i <= j} min(1, (m - i + 1) p_(i)); a difference is significant when its
  adjusted p-value is below alpha (0.05). This bounds the family-wise error rate at alpha.

With one seed there is no variance estimate: intervals and p-values are None and the report
says that the study cannot rank its variants.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from scipy import stats as scipy_stats

ALPHA = 0.05
CONFIDENCE = 0.95


@dataclass
class Summary:
    n: int
    mean: float
    std: float | None  # sample standard deviation (n - 1); None for one value
    ci95: tuple[float, float] | None


@dataclass
class PairedDifference:
    n: int
    mean: float
    ci95: tuple[float, float] | None
    p_value: float | None
    p_holm: float | None = None
    significant: bool | None = None


def summarize(values: list[float], confidence: float = CONFIDENCE) -> Summary:
    """Mean, sample standard deviation and Student-t interval of `values`."""
    n = len(values)
    if n == 0:
        raise ValueError("summarize: no values")
    mean = math.fsum(values) / n
    if n == 1:
        return Summary(1, mean, None, None)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(scipy_stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return Summary(n, mean, std, (mean - half, mean + half))


def paired_difference(values: list[float], baseline: list[float],
                      confidence: float = CONFIDENCE) -> PairedDifference:
    """Paired t statistics of values[i] - baseline[i] (index i: the same seed)."""
    if len(values) != len(baseline):
        raise ValueError(f"paired_difference: {len(values)} values against {len(baseline)} "
                         "baseline values; allowed: one per seed in both")
    differences = [v - b for v, b in zip(values, baseline)]
    summary = summarize(differences, confidence)
    if summary.n == 1:
        return PairedDifference(1, summary.mean, None, None)
    if summary.std == 0.0:  # identical differences: no spread, the t statistic is 0 or infinite
        return PairedDifference(summary.n, summary.mean, summary.ci95,
                                1.0 if summary.mean == 0.0 else 0.0)
    t_value = summary.mean / (summary.std / math.sqrt(summary.n))
    p_value = 2.0 * float(scipy_stats.t.sf(abs(t_value), summary.n - 1))
    return PairedDifference(summary.n, summary.mean, summary.ci95, p_value)


def holm(p_values: dict[str, float | None], alpha: float = ALPHA) -> dict[str, tuple[float, bool]]:
    """{name: (Holm-adjusted p-value, significant)} for the names whose p-value is not None."""
    ordered = sorted((p, name) for name, p in p_values.items() if p is not None)
    m = len(ordered)
    adjusted, running = {}, 0.0
    for rank, (p, name) in enumerate(ordered):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[name] = (running, running < alpha)
    return adjusted


def compare_to_baseline(finals: dict[str, list[float]], baseline: str,
                        alpha: float = ALPHA) -> dict[str, PairedDifference]:
    """Paired differences of every variant but the baseline, with Holm's correction applied."""
    differences = {name: paired_difference(values, finals[baseline])
                   for name, values in finals.items() if name != baseline}
    for name, (p_holm, significant) in holm({n: d.p_value for n, d in differences.items()},
                                            alpha).items():
        differences[name].p_holm = p_holm
        differences[name].significant = significant
    return differences


def verdict(difference: PairedDifference, lower_is_better: bool = True) -> str:
    """The difference in words: better / worse / no significant difference / cannot tell."""
    if difference.p_value is None:
        return "cannot tell (one seed)"
    if not difference.significant:
        return "no significant difference"
    better = difference.mean < 0 if lower_is_better else difference.mean > 0
    return "significantly better" if better else "significantly worse"
