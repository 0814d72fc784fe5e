"""Paired estimator comparisons (dashboard.stats) against closed forms worked out by hand.

With n = 3 seeds the t distribution has 2 degrees of freedom, where both the quantile and the
two-sided p-value have closed forms: t(q, 2) = (2q − 1)/√(2q(1 − q)) and p = 1 − |t|/√(t² + 2).
"""
import math

import pytest

from dashboard import figures, report
from dashboard.stats import mean, mean_std, paired_comparisons, paired_difference, sample_std, t_interval


def t_quantile_df2(q):
    return (2 * q - 1) / math.sqrt(2 * q * (1 - q))


def p_df2(t):
    return 1 - abs(t) / math.sqrt(t * t + 2)


def test_mean_std_and_t_interval_match_the_hand_computation():
    values = [0.80, 0.82, 0.87]  # mean 2.49/3 = 0.83, deviations (−0.03, −0.01, 0.04): sd = √(0.0026/2)
    sd = math.sqrt(0.0026 / 2)
    assert mean(values) == pytest.approx(0.83, rel=1e-12) and sample_std(values) == pytest.approx(sd, rel=1e-12)
    assert mean_std(values) == pytest.approx((0.83, sd), rel=1e-12)
    assert mean_std([0.5]) == (0.5, 0.0) and sample_std([0.5]) is None and math.isnan(mean([]))
    for confidence, q in ((0.95, 0.975), (0.9, 0.95)):
        half = t_quantile_df2(q) * sd / math.sqrt(3)
        assert t_interval(0.83, sd, 3, confidence) == pytest.approx((0.83 - half, 0.83 + half), rel=1e-9)
    assert t_interval(0.83, None, 1) is None and t_interval(0.83, 0.1, 1) is None


def test_figures_and_report_use_the_one_mean_std():
    assert figures.mean_std is report.mean_std is mean_std


def test_paired_difference_matches_the_hand_computation():
    # d = (0.02, 0.01, 0.04): mean 0.07/3, sd = √(7/3)·0.01, t = mean/(sd/√3) = √7
    out = paired_difference([0.80, 0.82, 0.87], [0.78, 0.81, 0.83])
    mean, sd = 0.07 / 3, math.sqrt(7 / 3) * 0.01
    half = t_quantile_df2(0.975) * sd / math.sqrt(3)
    assert out["n"] == 3 and out["diff"] == pytest.approx(mean, rel=1e-12)
    assert (out["ci_low"], out["ci_high"]) == pytest.approx((mean - half, mean + half), rel=1e-9)
    assert out["p_value"] == pytest.approx(1 - math.sqrt(7) / 3, rel=1e-9) and out["significant"] is False
    narrower = paired_difference([0.80, 0.82, 0.87], [0.78, 0.81, 0.83], confidence=0.9)
    half90 = t_quantile_df2(0.95) * sd / math.sqrt(3)
    assert (narrower["ci_low"], narrower["ci_high"]) == pytest.approx((mean - half90, mean + half90), rel=1e-9)


def test_significance_follows_the_confidence_level():
    # d = (0.02, 0.03, 0.05): t = (0.1/3)/(√(7/3)·0.01/√3) = 10/√7, p ≈ 0.064: significant at 90 %, not at 95 %
    a, b = [0.82, 0.83, 0.85], [0.80, 0.80, 0.80]
    p = p_df2(10 / math.sqrt(7))
    assert 0.05 < p < 0.1
    for confidence, significant in ((0.95, False), (0.9, True)):
        out = paired_difference(a, b, confidence=confidence)
        assert out["p_value"] == pytest.approx(p, rel=1e-9) and out["significant"] is significant
    worse = paired_difference(b, a, confidence=0.9)  # two-sided: the sign of the difference does not matter
    assert worse["diff"] == pytest.approx(-0.1 / 3) and worse["p_value"] == pytest.approx(p, rel=1e-9)


def test_zero_spread_and_too_few_seeds():
    same_gain = paired_difference([0.75, 0.625, 0.5], [0.5, 0.375, 0.25])  # exact binary fractions: sd = 0 exactly
    assert same_gain["diff"] == 0.25 and same_gain["p_value"] == 0.0 and same_gain["significant"]
    assert same_gain["ci_low"] == same_gain["ci_high"] == 0.25
    tie = paired_difference([0.8, 0.9], [0.8, 0.9])
    assert tie["diff"] == 0 and tie["p_value"] == 1.0 and not tie["significant"]
    one = paired_difference([0.9], [0.8])
    assert one["n"] == 1 and one["diff"] == pytest.approx(0.1)
    assert (one["ci_low"], one["ci_high"], one["p_value"], one["significant"]) == (None, None, None, False)
    assert math.isnan(paired_difference([], [])["diff"])


def trial(label, w, a, seed, acc):
    return {"estimator": label, "estimator_label": label, "w_bits": w, "a_bits": a, "seed": seed,
            "final_test_acc": acc}


def test_paired_comparisons_use_common_seeds_per_bit_configuration():
    trials = [trial("aqe", 2, 2, s, 0.80 + 0.01 * s) for s in (0, 1, 2)] + [
        trial("ste", 2, 2, s, 0.70 + 0.01 * s) for s in (1, 2, 3)] + [
        trial("ste", 2, 2, 0, None),  # unfinished: not a pair
        trial("aqe", 1, 1, 0, 0.9), trial("ste", 1, 1, 5, 0.9),  # no common seed at W1A1 (sorted first): no row
        trial("aqe", 32, 32, 0, 0.95), trial("ewgs", 2, 2, 1, 0.5)]  # no partner: no row
    rows = paired_comparisons(trials, ["aqe"], ["ste", "ewgs"])
    assert [(r["candidate"], r["baseline"], r["bits"], r["seeds"]) for r in rows] == [
        ("aqe", "ste", "W2A2", [1, 2]), ("aqe", "ewgs", "W2A2", [1])]
    assert rows[0]["n"] == 2 and rows[0]["diff"] == pytest.approx(0.10) and rows[1]["diff"] == pytest.approx(0.31)


def test_paired_comparisons_pair_a_candidate_only_with_a_baseline_on_its_grid():
    """aqe on the uniform grid is compared with clipped STE on the uniform grid, not with clipped STE on MINW's
    levels (that would compare grids); labels whose trials carry no grid pair as before."""
    def on(grid, label, seed, acc):
        return {**trial(label, 2, 2, seed, acc), "grid": grid}
    trials = [on("minw", "aqe", s, 0.86) for s in (0, 1)] + [on("minw", "clipped_ste", s, 0.85) for s in (0, 1)] + [
        on("uniform", "aqe[grid=uniform]", s, 0.84) for s in (0, 1)] + [
        on("uniform", "clipped_ste[grid=uniform]", s, 0.83) for s in (0, 1)] + [
        trial("ste", 2, 2, s, 0.80) for s in (0, 1)]  # no grid recorded
    rows = paired_comparisons(trials, ["aqe", "aqe[grid=uniform]"], ["clipped_ste", "clipped_ste[grid=uniform]", "ste"])
    assert {(r["candidate"], r["baseline"]) for r in rows} == {
        ("aqe", "clipped_ste"), ("aqe", "ste"), ("aqe[grid=uniform]", "clipped_ste[grid=uniform]"),
        ("aqe[grid=uniform]", "ste")}
    assert all(r["diff"] == pytest.approx(0.01) for r in rows if r["baseline"] != "ste")
