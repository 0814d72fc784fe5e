"""Paired comparisons of estimators over the same seeds (pure functions over Trial records)."""
from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence

from scipy import optimize, stats

from .figures import DEFAULT_METRIC, bit_config, config_label, config_sort_key, estimator_label, metric_field


def _by_seed(trials: Iterable[dict], label: str, metric: str) -> dict[tuple, dict[int, float]]:
    field = metric_field(metric)
    out: dict[tuple, dict[int, float]] = {}
    for t in trials:
        if estimator_label(t) == label and t.get(field) is not None:
            out.setdefault(bit_config(t["w_bits"], t["a_bits"]), {})[t["seed"]] = t[field]
    return out


def paired_difference(a: list[float], b: list[float], confidence: float = 0.95) -> dict:
    """Mean of a − b with a paired t-interval and two-sided p-value (None where n < 2).

    d_i = a_i − b_i,  mean ± t(1 − (1−c)/2, n−1)·sd(d)/√n,  p from the paired t-test.
    """
    n = len(a)
    d = [x - y for x, y in zip(a, b)]
    mean = sum(d) / n if n else float("nan")
    out = {"n": n, "diff": mean, "ci_low": None, "ci_high": None, "p_value": None, "significant": False}
    if n >= 2:
        sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
        half = stats.t.ppf(1 - (1 - confidence) / 2, n - 1) * sd / math.sqrt(n)
        p = 0.0 if sd == 0 and mean != 0 else 1.0 if sd == 0 else float(stats.ttest_rel(a, b).pvalue)
        out.update(ci_low=mean - half, ci_high=mean + half, p_value=p, significant=p < 1 - confidence)
    return out


def paired_comparisons(trials: list[dict], candidates: Iterable[str], baselines: Iterable[str],
                       metric: str = DEFAULT_METRIC) -> list[dict]:
    """Every candidate against every baseline, per bit configuration, over their common seeds
    (``metric``: final or validation-selected test accuracy)."""
    rows = []
    baselines = list(baselines)
    for cand in candidates:
        cand_runs = _by_seed(trials, cand, metric)
        for base in baselines:
            base_runs = _by_seed(trials, base, metric)
            for config in sorted(set(cand_runs) & set(base_runs), key=config_sort_key):
                seeds = sorted(set(cand_runs[config]) & set(base_runs[config]))
                if not seeds:
                    continue
                a = [cand_runs[config][s] for s in seeds]
                b = [base_runs[config][s] for s in seeds]
                rows.append({"candidate": cand, "baseline": base, "bits": config_label(config), "seeds": seeds,
                             "differences": [x - y for x, y in zip(a, b, strict=True)], **paired_difference(a, b)})
    return rows


# ---------------------------------------------------------------- a family of paired comparisons
# Holm-adjusted p-values, the paired effect size and the smallest difference a design could detect.

ALPHA = 0.05  # two-sided level of every paired test, and of the family after Holm's adjustment
POWER = 0.8  # the power at which detectable_difference is reported


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm–Bonferroni adjusted p-values, in the order given; None stays None (and is not in the family).

    With the m p-values sorted, p(1) ≤ … ≤ p(m): adj(i) = max over j ≤ i of min(1, (m − j + 1)·p(j)),
    so that adj(i) < α is Holm's step-down procedure at family-wise level α: p(j) < α / (m − j + 1)
    for every j ≤ i.
    """
    order = sorted((i for i, p in enumerate(p_values) if p is not None), key=lambda i: p_values[i])
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def cohens_dz(differences: Sequence[float]) -> float | None:
    """Cohen's d_z, the paired effect size: mean(d) / sd(d) (sample sd, n − 1); None where n < 2 or the
    differences are equal (sd = 0, or below 1e-9·|mean|: equal up to floating-point rounding)."""
    if len(differences) < 2:
        return None
    mean, sd = statistics.fmean(differences), statistics.stdev(differences)
    return None if sd <= 1e-9 * abs(mean) else mean / sd


def paired_t_power(delta: float, n: int, sd: float, alpha: float = ALPHA) -> float:
    """Power of the two-sided paired t-test at level ``alpha`` with ``n`` pairs whose differences have
    mean ``delta`` and standard deviation ``sd``: P(|T| > t(1 − α/2, n − 1)) for T noncentral t with
    n − 1 degrees of freedom and noncentrality δ·√n / sd."""
    return _t_test_power(delta * math.sqrt(n) / sd, n - 1, alpha)


def _t_test_power(noncentrality: float, df: int, alpha: float) -> float:
    # the lower tail P(T < −t) as P(T' > t) with T' = −T ~ nct(df, −nc): scipy's nct.cdf returns NaN
    # deep in that tail for some parameters (scipy/scipy#25470, e.g. df = 1, nc = 8), its sf does not
    t = stats.t.ppf(1 - alpha / 2, df)
    return float(stats.nct.sf(t, df, noncentrality) + stats.nct.sf(t, df, -noncentrality))


def detectable_difference(n: int, sd: float, alpha: float = ALPHA, power: float = POWER) -> float | None:
    """The smallest difference δ ≥ 0 that a two-sided paired t-test at level ``alpha`` with ``n`` pairs
    and differences of standard deviation ``sd`` detects with probability ``power``: the root of
    :func:`paired_t_power` = ``power`` (exact noncentral t, no normal approximation); None where
    n < 2 or sd = 0."""
    if n < 2 or not sd > 0:
        return None
    high = 1.0  # power grows with the noncentrality from alpha at 0: bracket the root, then solve
    while _t_test_power(high, n - 1, alpha) < power:
        high *= 2
    noncentrality = optimize.brentq(lambda nc: _t_test_power(nc, n - 1, alpha) - power, 0.0, high, xtol=1e-12)
    return noncentrality * sd / math.sqrt(n)


def adjust_family(rows: Sequence[dict], alpha: float = ALPHA, power: float = POWER) -> list[dict]:
    """The rows of :func:`paired_comparisons` taken as one family of tests: each with ``p_adjusted``
    (:func:`holm` over the family), ``significant`` decided on it (adjusted p < ``alpha``, replacing
    the per-test decision), ``d_z`` (:func:`cohens_dz`) and ``detectable`` (:func:`detectable_difference`
    from its n and the sd of its differences; None for a significant comparison)."""
    adjusted = holm([r["p_value"] for r in rows])
    out = []
    for r, p in zip(rows, adjusted, strict=True):
        d = r["differences"]
        significant = p is not None and p < alpha
        detectable = None if significant or len(d) < 2 else detectable_difference(len(d), statistics.stdev(d),
                                                                                 alpha, power)
        out.append({**r, "p_adjusted": p, "significant": significant, "d_z": cohens_dz(d), "detectable": detectable})
    return out
