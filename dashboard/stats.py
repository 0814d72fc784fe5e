"""Statistics over seeds, in one place: mean, sample std, the t-interval, and paired comparisons of
estimators over the same seeds (pure functions over numbers and Trial records; the store's
leaderboard, the figures and the report use them). Imports no other dashboard module."""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from functools import lru_cache

from scipy import optimize, stats

from workers.records import DEFAULT_RANK_METRIC as DEFAULT_METRIC
from workers.records import bit_config, config_label, config_sort_key, metric_field
from workers.records import trial_label as estimator_label


def mean(values: Sequence[float]) -> float:
    """Σx / n (NaN for no values)."""
    return sum(values) / len(values) if len(values) else float("nan")


def sample_std(values: Sequence[float]) -> float | None:
    """√(Σ(x − mean)² / (n − 1)); None when n < 2."""
    if len(values) < 2:
        return None
    m = mean(values)
    return math.sqrt(sum((x - m) ** 2 for x in values) / (len(values) - 1))


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value: no spread to show)."""
    return mean(values), sample_std(values) or 0.0


@lru_cache(maxsize=1024)
def t_quantile(q: float, dof: int) -> float:
    """The ``q`` quantile of Student's t with ``dof`` degrees of freedom."""
    return float(stats.t.ppf(q, dof))


def t_interval(mean: float, std: float | None, n: int, confidence: float = 0.95) -> tuple[float, float] | None:
    """``mean ± t(1 − (1−c)/2, n−1)·std/√n``: the two-sided ``confidence`` interval of a mean; None when n < 2."""
    if n < 2 or std is None:
        return None
    half = t_quantile(1 - (1 - confidence) / 2, n - 1) * std / math.sqrt(n)
    return mean - half, mean + half


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
    d = [x - y for x, y in zip(a, b, strict=False)]
    diff, sd = mean(d), sample_std(d)
    out = {"n": n, "diff": diff, "ci_low": None, "ci_high": None, "p_value": None, "significant": False}
    if sd is not None:
        p = 0.0 if sd == 0 and diff != 0 else 1.0 if sd == 0 else float(stats.ttest_rel(a, b).pvalue)
        ci_low, ci_high = t_interval(diff, sd, n, confidence)
        out.update(ci_low=ci_low, ci_high=ci_high, p_value=p, significant=p < 1 - confidence)
    return out


def paired_comparisons(trials: list[dict], candidates: Iterable[str], baselines: Iterable[str],
                       metric: str = DEFAULT_METRIC) -> list[dict]:
    """Every candidate against every baseline on the same quantizer grid (trials' ``grid``; a label whose
    trials carry none pairs with any), per bit configuration, over their common seeds (``metric``: final or
    validation-selected test accuracy): a comparison of estimators, never of grids."""
    rows = []
    baselines = list(baselines)
    grids: dict[str, set] = {}
    for t in trials:
        if t.get("grid") is not None:
            grids.setdefault(estimator_label(t), set()).add(t["grid"])
    for cand in candidates:
        cand_runs = _by_seed(trials, cand, metric)
        for base in baselines:
            if cand in grids and base in grids and not grids[cand] & grids[base]:
                continue
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
    m, sd = mean(differences), sample_std(differences)
    return None if sd is None or sd <= 1e-9 * abs(m) else m / sd


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
        detectable = None if significant or len(d) < 2 else detectable_difference(len(d), sample_std(d),
                                                                                 alpha, power)
        out.append({**r, "p_adjusted": p, "significant": significant, "d_z": cohens_dz(d), "detectable": detectable})
    return out
