"""Paired comparisons of estimators over the same seeds (pure functions over Trial records)."""
from __future__ import annotations

import math
from collections.abc import Iterable

from scipy import stats

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
                rows.append({"candidate": cand, "baseline": base, "bits": config_label(config),
                             "seeds": seeds, **paired_difference(a, b)})
    return rows
