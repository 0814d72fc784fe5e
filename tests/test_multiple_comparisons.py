"""A report's family of paired comparisons (dashboard.stats): Holm's adjustment, Cohen's d_z and the
smallest difference a design could detect, against hand computations and independent searches."""
import math
import random

import numpy as np
import pytest
from scipy import integrate, stats

from dashboard.stats import (
    adjust_family,
    cohens_dz,
    detectable_difference,
    holm,
    paired_comparisons,
    paired_t_power,
)


def test_holm_matches_the_hand_computation():
    # sorted: 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 = 0.04 → 0.06 (never below the one before)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02], rel=1e-12)
    assert holm([0.6, 0.7]) == [1.0, 1.0]  # 0.6·2 = 1.2 capped at 1; 0.7·1 raised to 1
    assert holm([None, 0.2, 0.01]) == pytest.approx([None, 0.2, 0.02])  # a comparison without a test is no member
    assert holm([0.03]) == [0.03] and holm([]) == []


def step_down_rejections(p_values, alpha):
    """Holm's procedure as stated: walk up the sorted p-values, reject while p(j) < α / (m − j + 1)."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    rejected = set()
    for j, i in enumerate(order):
        if p_values[i] >= alpha / (len(p_values) - j):
            break
        rejected.add(i)
    return rejected


def test_adjusted_p_below_alpha_is_holms_step_down_procedure():
    rng = random.Random(14)
    for _ in range(300):
        p = [rng.choice((rng.random(), rng.random() * 0.06)) for _ in range(rng.randint(1, 12))]
        adjusted = holm(p)
        ranked = sorted(range(len(p)), key=lambda i: p[i])
        assert all(adjusted[i] >= p[i] for i in range(len(p)))
        assert all(adjusted[a] <= adjusted[b] for a, b in zip(ranked, ranked[1:], strict=False))  # monotone in p
        for alpha in (0.01, 0.05, 0.1):
            assert {i for i, q in enumerate(adjusted) if q < alpha} == step_down_rejections(p, alpha)


def test_cohens_dz_on_a_known_input():
    # d = (0.02, 0.01, 0.04): mean 0.07/3, sd √(7/3)·0.01, so d_z = √(7/3)
    assert cohens_dz([0.02, 0.01, 0.04]) == pytest.approx(math.sqrt(7 / 3), rel=1e-12)
    assert cohens_dz([-0.02, -0.01, -0.04]) == pytest.approx(-math.sqrt(7 / 3), rel=1e-12)
    assert cohens_dz([0.05]) is None
    assert cohens_dz([0.25, 0.25]) is None  # no spread
    assert cohens_dz([0.82 - 0.80, 0.84 - 0.82, 0.86 - 0.84]) is None  # equal up to rounding


def brute_force_detectable(n, sd, alpha=0.05, power=0.8, steps=200_000):
    """The first δ on a grid of step sd·(16/steps) whose power, from scipy's noncentral t, reaches ``power``
    (P(T > t) + P(T ≤ −t), the second as 1 − P(T > −t): scipy's nct.cdf is NaN deep in that tail)."""
    deltas = np.arange(steps + 1) * sd * 16 / steps
    df, t = n - 1, stats.t.ppf(1 - alpha / 2, n - 1)
    nc = deltas * math.sqrt(n) / sd
    powers = stats.nct.sf(t, df, nc) + (1 - stats.nct.sf(-t, df, nc))
    assert not np.isnan(powers).any()
    k = int(np.argmax(powers >= power))
    assert k > 0 and powers[k] >= power
    return deltas[k - 1], deltas[k]


def integrated_power(delta, n, sd, alpha=0.05):
    """The paired t-test's power without the noncentral t: T = (Z + nc)/√(V/df), Z normal, V χ²(df);
    P(|T| > t) = E_V[Φ(nc − t·√(V/df)) + Φ(−nc − t·√(V/df))], integrated over V's density."""
    df, t, nc = n - 1, stats.t.ppf(1 - alpha / 2, n - 1), delta * math.sqrt(n) / sd

    def given(v):
        s = t * math.sqrt(v / df)
        return (stats.norm.cdf(nc - s) + stats.norm.cdf(-nc - s)) * stats.chi2.pdf(v, df)

    return integrate.quad(given, 0, np.inf, epsabs=1e-12, limit=200)[0]


@pytest.mark.parametrize("n, sd", [(2, 1.0), (3, 0.01), (4, 0.004), (5, 1.0), (10, 2.5)])
def test_detectable_difference_matches_a_brute_force_search(n, sd):
    below, above = brute_force_detectable(n, sd)
    found = detectable_difference(n, sd)
    assert below < found <= above
    assert paired_t_power(found, n, sd) == pytest.approx(0.8, abs=1e-9)
    assert integrated_power(found, n, sd) == pytest.approx(0.8, abs=1e-6)
    # more seeds or a smaller spread detect smaller differences; a normal approximation would claim too much
    assert detectable_difference(n + 1, sd) < found and detectable_difference(n, sd / 2) == pytest.approx(found / 2)
    assert found > (stats.norm.ppf(0.975) + stats.norm.ppf(0.8)) * sd / math.sqrt(n)


def test_the_detectable_difference_is_detected_four_times_in_five():
    """Monte Carlo, no noncentral t: paired t-tests on 5 seeds whose differences have mean δ and sd 1."""
    n, delta = 5, detectable_difference(5, 1.0)
    d = np.random.default_rng(14).normal(delta, 1.0, size=(40_000, n))
    t = d.mean(axis=1) / (d.std(axis=1, ddof=1) / math.sqrt(n))
    rejected = 2 * stats.t.sf(np.abs(t), n - 1) < 0.05
    assert rejected.mean() == pytest.approx(0.8, abs=0.01)  # standard error 0.002


def test_detectable_difference_needs_two_pairs_and_a_spread():
    assert detectable_difference(1, 0.01) is None and detectable_difference(3, 0.0) is None


def trial(label, w, a, seed, acc):
    return {"estimator": label, "estimator_label": label, "w_bits": w, "a_bits": a, "seed": seed,
            "final_test_acc": acc}


def test_a_family_is_judged_on_holm_adjusted_p_values():
    accs = {"ste": (0.80, 0.80, 0.80), "aqe": (0.82, 0.83, 0.84), "ewgs": (0.81, 0.78, 0.82), "lsq": (0.9,)}
    trials = [trial(label, 1, 1, seed, acc) for label, values in accs.items() for seed, acc in enumerate(values)]
    # lsq has one seed: no test, so no member of the family
    rows = adjust_family(paired_comparisons(trials, ["aqe", "ewgs", "lsq"], ["ste"]))
    assert [r["candidate"] for r in rows] == ["aqe", "ewgs", "lsq"]
    aqe, ewgs, lsq = rows
    # aqe: d = (0.02, 0.03, 0.04), t = 3√3 on 2 degrees of freedom, p = 1 − t/√(t² + 2); two tests: p·2
    p = 1 - 3 * math.sqrt(3) / math.sqrt(29)
    assert aqe["p_value"] == pytest.approx(p, rel=1e-6) and aqe["p_adjusted"] == pytest.approx(2 * p, rel=1e-6)
    assert aqe["p_value"] < 0.05 < aqe["p_adjusted"] and aqe["significant"] is False  # alone yes, in the family no
    assert aqe["d_z"] == pytest.approx(3.0, rel=1e-9)
    assert aqe["detectable"] == pytest.approx(detectable_difference(3, 0.01), rel=1e-6)
    assert ewgs["p_adjusted"] == pytest.approx(max(2 * p, ewgs["p_value"]), rel=1e-9)
    assert (lsq["p_value"], lsq["p_adjusted"], lsq["significant"], lsq["d_z"], lsq["detectable"]) == (
        None, None, False, None, None)
    alone = adjust_family(paired_comparisons(trials, ["aqe"], ["ste"]))[0]
    assert alone["p_adjusted"] == pytest.approx(p, rel=1e-6) and alone["significant"] is True
    assert alone["detectable"] is None  # significant: nothing to bound
