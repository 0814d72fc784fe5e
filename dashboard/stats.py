"""Statistics over seeds, in one place: mean, sample std, the t-interval, and paired comparisons of
estimators over the same seeds (pure functions over numbers and Trial records; the store's
leaderboard, the figures and the report use them). Imports no other dashboard module."""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from functools import lru_cache

from scipy import stats

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
    d = [x - y for x, y in zip(a, b)]
    diff, sd = mean(d), sample_std(d)
    out = {"n": n, "diff": diff, "ci_low": None, "ci_high": None, "p_value": None, "significant": False}
    if sd is not None:
        p = 0.0 if sd == 0 and diff != 0 else 1.0 if sd == 0 else float(stats.ttest_rel(a, b).pvalue)
        ci_low, ci_high = t_interval(diff, sd, n, confidence)
        out.update(ci_low=ci_low, ci_high=ci_high, p_value=p, significant=p < 1 - confidence)
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
                rows.append({"candidate": cand, "baseline": base, "bits": config_label(config),
                             "seeds": seeds, **paired_difference(a, b)})
    return rows
