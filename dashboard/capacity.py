"""AQE's lead against model capacity: paired differences per model size, their trend, the figure and table.

Pure over plain records (docs/CONTRACTS.md). A report over several runs (one per model size, e.g. Models
A–D at one width divisor) tags each trial with ``model_label`` (:func:`model_label`); the size of a model is
its number of 1-bit weights, read from its quantized trials (``final["weight_bits_total"] / w_bits``: every
quantized kernel holds ``w_bits`` bits a weight).

The trend: per candidate, baseline and bit configuration, the per-seed differences d (candidate − baseline,
paired on the seed) regressed on x = log₂(1-bit weights) by ordinary least squares (:func:`trend`). Every
seed's difference is one observation; the seeds of one model share its x.
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence

import plotly.colors
import plotly.graph_objects as go
from scipy import stats

from workers.records import FLOAT_BITS, FLOAT_LABEL, bit_config

from .figures import TEMPLATE, text
from .paper_results import paper_tables
from .stats import ALPHA, holm, paired_comparisons, t_quantile

#: the paper's Table II (CIFAR-100, W1A1, full width, trained from scratch): AQE's row and STE's shaded row
PAPER_TABLE, PAPER_CANDIDATE, PAPER_BASELINE = "cifar100", "aqe", "ste"
#: 1-bit weights of Models A–D at full width on CIFAR-100 (3×32×32, 100 classes) as workers.models.convnet
#: builds them (the 10-class counts of its docstring plus the head's 90 extra outputs; a test builds them)
PAPER_WEIGHTS = {"convnet_a": 10_444_160, "convnet_b": 4_654_784, "convnet_c": 2_637_504, "convnet_d": 1_825_472}
PALETTE = plotly.colors.qualitative.Dark24  # the report's palette
PAPER_NAME = "paper, Table II: AQE − STE (CIFAR-100, full width, W1A1)"


def model_label(model: str, options: dict | None = None) -> str:
    """``convnet_a width_divisor 8``: the model and its options, named as the protocol label names them."""
    return model + "".join(f" {k} {v}" for k, v in sorted((options or {}).items()))


def one_bit_weights(trials: Iterable[dict]) -> int | None:
    """The model's 1-bit weight count from its first quantized trial that recorded its weight bits; None without one."""
    for t in trials:
        bits, w = (t.get("final") or {}).get("weight_bits_total"), bit_config(t.get("w_bits"), t.get("a_bits"))[0]
        if bits and w < FLOAT_BITS and t.get("estimator") != FLOAT_LABEL:
            return int(bits) // w
    return None


def model_sizes(trials: Iterable[dict]) -> dict[str, int | None]:
    """``{model_label: 1-bit weights}`` over the trials that carry a ``model_label``, smallest first (None last)."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for t in trials:
        if t.get("model_label"):
            groups[t["model_label"]].append(t)
    sizes = {label: one_bit_weights(ts) for label, ts in groups.items()}
    return dict(sorted(sizes.items(), key=lambda kv: (kv[1] is None, kv[1] or 0, kv[0])))


def covers_sizes(trials: Iterable[dict]) -> bool:
    """True when the trials span at least two model sizes (distinct 1-bit weight counts)."""
    return len({w for w in model_sizes(trials).values() if w is not None}) >= 2


def comparisons(trials: list[dict], candidates: Iterable[str], baselines: Iterable[str],
                metric: str = "final") -> list[dict]:
    """:func:`dashboard.stats.paired_comparisons` within each model (seeds pair only within a model), each row
    with ``model`` (its label; None for trials without one), ``weights`` and ``log2_weights`` (None if unknown)."""
    candidates, baselines = list(candidates), list(baselines)
    groups: dict[str | None, list[dict]] = defaultdict(list)
    for t in trials:
        groups[t.get("model_label")].append(t)
    sizes = model_sizes(trials)
    order = sorted(groups, key=lambda m: (m is None, sizes.get(m) or 0, m or ""))
    rows = []
    for model in order:
        weights = sizes.get(model) if model is not None else None
        for r in paired_comparisons(groups[model], candidates, baselines, metric):
            rows.append({**r, "model": model, "weights": weights,
                         "log2_weights": math.log2(weights) if weights else None})
    return rows


def trend(x: Sequence[float], y: Sequence[float], confidence: float = 0.95) -> dict:
    """Ordinary least squares y = a + b·x with the slope's t-interval and two-sided p (H0: b = 0).

    b = Sxy / Sxx, a = ȳ − b·x̄, s² = Σ(y − a − b·x)² / (n − 2), se(b) = s / √Sxx,
    b ± t(1 − (1−c)/2, n − 2)·se(b), p = 2·P(T > |b / se(b)|) with T ~ t(n − 2). The interval and p are
    None where n < 3 or x does not vary (no slope); an exact fit (s = 0) has a zero-width interval.
    """
    n = len(x)
    out = {"n": n, "slope": None, "intercept": None, "se": None, "ci_low": None, "ci_high": None, "p_value": None}
    if n < 2 or n != len(y):
        return out
    mx, my = sum(x) / n, sum(y) / n
    sxx = sum((xi - mx) ** 2 for xi in x)
    if sxx == 0:
        return out
    slope = sum((xi - mx) * (yi - my) for xi, yi in zip(x, y, strict=True)) / sxx
    intercept = my - slope * mx
    out.update(slope=slope, intercept=intercept)
    if n < 3:
        return out
    s2 = sum((yi - intercept - slope * xi) ** 2 for xi, yi in zip(x, y, strict=True)) / (n - 2)
    se = math.sqrt(s2 / sxx)
    half = t_quantile(1 - (1 - confidence) / 2, n - 2) * se
    p = (0.0 if slope else 1.0) if se == 0 else float(2 * stats.t.sf(abs(slope / se), n - 2))
    out.update(se=se, ci_low=slope - half, ci_high=slope + half, p_value=p)
    return out


def trends(rows: Sequence[dict], confidence: float = 0.95, alpha: float = ALPHA) -> list[dict]:
    """One :func:`trend` per (metric, candidate, baseline, bits) over the rows of :func:`comparisons` with a
    known size: the per-seed differences against log₂ of their model's 1-bit weights, where at least two
    sizes take part. Holm's adjustment (``p_adjusted``, ``significant``) runs over the trend tests of one accuracy.

    ``on_means`` is the same fit to the models' mean differences (one point per model, m − 2 degrees of
    freedom): the same slope when every model has the same number of seeds, and an interval that also
    counts how far the models stray from a line, not only how the seeds scatter."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if r.get("log2_weights") is not None:
            groups[(r.get("metric", "final"), r["candidate"], r["baseline"], r["bits"])].append(r)
    out = []
    for (metric, cand, base, bits), rs in groups.items():
        if len({r["log2_weights"] for r in rs}) < 2:
            continue
        x = [r["log2_weights"] for r in rs for _ in r["differences"]]
        y = [d for r in rs for d in r["differences"]]
        means = trend([r["log2_weights"] for r in rs], [r["diff"] for r in rs], confidence)
        out.append({"metric": metric, "candidate": cand, "baseline": base, "bits": bits, "models": len(rs),
                    **trend(x, y, confidence), "on_means": means})
    for metric in {r["metric"] for r in out}:  # one family per accuracy, as the paired tests'
        family = [r for r in out if r["metric"] == metric]
        for r, p in zip(family, holm([r["p_value"] for r in family]), strict=True):
            r.update(p_adjusted=p, significant=p is not None and p < alpha)
    return out


def paper_differences() -> list[dict]:
    """The paper's Table II AQE − STE at W1A1 per model (CIFAR-100, full width): ``[{model, weights,
    log2_weights, diff}]``, from the printed accuracies (dashboard/data/paper_minw.json)."""
    data = paper_tables()
    rows = data["tables"][PAPER_TABLE]["rows"]
    acc = {r["estimator"]: r["acc"] for r in rows if (r["M"], r["N"]) == (1, 1)}
    out = []
    for column, model in data["models"].items():
        diff = round(acc[PAPER_CANDIDATE][column] - acc[PAPER_BASELINE][column], 6)
        out.append({"model": model, "column": column, "weights": PAPER_WEIGHTS[model],
                    "log2_weights": math.log2(PAPER_WEIGHTS[model]), "diff": diff})
    return sorted(out, key=lambda p: p["weights"])


def lead_figure(rows: Sequence[dict], trend_rows: Sequence[dict] = (), paper: Sequence[dict] | None = None,
                metric: str = "final") -> go.Figure:
    """"AQE's lead vs capacity": x = log₂ 1-bit weights, y = candidate − baseline in points, our mean paired
    differences with their 95 % intervals (one series per candidate, baseline and bits, with its fitted
    trend line), and the paper's Table II AQE − STE points (CIFAR-100, full width) beside them."""
    fig = go.Figure()
    series: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if r.get("log2_weights") is not None and r.get("metric", "final") == metric:
            series[(r["candidate"], r["baseline"], r["bits"])].append(r)
    fits = {(t["candidate"], t["baseline"], t["bits"]): t for t in trend_rows if t["metric"] == metric}
    for i, key in enumerate(series):
        rs = sorted(series[key], key=lambda r: r["log2_weights"])
        cand, base, bits = key
        name = f"ours: {cand} − {base}, {bits}"
        color = PALETTE[i % len(PALETTE)]
        dx = 0.03 * (i - (len(series) - 1) / 2)  # a small x offset keeps the error bars apart
        have_ci = [r for r in rs if r["ci_low"] is not None]
        fig.add_trace(go.Scatter(
            x=[r["log2_weights"] + dx for r in rs], y=[100 * r["diff"] for r in rs], mode="markers",
            name=text(name), legendgroup=name, marker=dict(color=color, size=9),
            error_y=dict(type="data", symmetric=False, visible=bool(have_ci),
                         array=[100 * (r["ci_high"] - r["diff"]) if r["ci_low"] is not None else 0 for r in rs],
                         arrayminus=[100 * (r["diff"] - r["ci_low"]) if r["ci_low"] is not None else 0 for r in rs]),
            customdata=[[r["model"], r["weights"], len(r["differences"])] for r in rs],
            hovertemplate="%{customdata[0]} (%{customdata[1]:,} weights): %{y:+.2f} points, n=%{customdata[2]}"
                          "<extra>" + text(name) + "</extra>",
            meta={"kind": "ours", "candidate": cand, "baseline": base, "bits": bits}))
        fit = fits.get(key)
        if fit and fit["slope"] is not None:
            xs = [rs[0]["log2_weights"], rs[-1]["log2_weights"]]
            fig.add_trace(go.Scatter(
                x=xs, y=[100 * (fit["intercept"] + fit["slope"] * v) for v in xs], mode="lines",
                name=text(f"{name}: trend"), legendgroup=name, showlegend=False, line=dict(color=color, dash="dot"),
                hoverinfo="skip", meta={"kind": "trend", "candidate": cand, "baseline": base, "bits": bits}))
    paper = paper_differences() if paper is None else paper
    if paper:
        fig.add_trace(go.Scatter(
            x=[p["log2_weights"] for p in paper], y=[100 * p["diff"] for p in paper], mode="markers+text",
            name=PAPER_NAME, text=[f"Model {p['column']}" for p in paper], textposition="top center",
            marker=dict(symbol="x-thin-open", size=12, color="#555", line=dict(width=2)),
            hovertemplate="%{text}, %{x:.2f}: %{y:+.1f} points<extra>paper (CIFAR-100)</extra>",
            meta={"kind": "paper"}))
    fig.add_hline(y=0, line=dict(color="#999", width=1))
    fig.update_layout(template=TEMPLATE, height=520, width=900, title="AQE's lead vs capacity",
                      legend=dict(orientation="h", yanchor="top", y=-0.2, x=0), margin=dict(t=60, b=170))
    fig.update_xaxes(title="log₂ of the model's 1-bit weight count")
    fig.update_yaxes(title="candidate − baseline, test accuracy (points)", zeroline=False)
    return fig


def lead_table(rows: Sequence[dict], metric: str = "final") -> dict:
    """The comparisons of ``metric`` pivoted: ``{"columns": [(candidate, baseline, bits)], "rows": [{"model",
    "weights", "cells": [the comparison row or None, per column]}]}``, models by size."""
    rows = [r for r in rows if r.get("metric", "final") == metric and r.get("model") is not None]
    columns = list(dict.fromkeys((r["candidate"], r["baseline"], r["bits"]) for r in rows))
    cell = {(r["model"], r["candidate"], r["baseline"], r["bits"]): r for r in rows}
    models = list(dict.fromkeys((r["model"], r["weights"]) for r in rows))  # comparisons() orders them by size
    return {"columns": columns, "rows": [{"model": m, "weights": w, "cells": [cell.get((m, *c)) for c in columns]}
                                         for m, w in models]}


def paper_trend() -> dict:
    """:func:`trend` over the paper's four printed differences (one per model, no seeds)."""
    paper = paper_differences()
    return trend([p["log2_weights"] for p in paper], [p["diff"] for p in paper])


def latex_table(rows: Sequence[dict], trend_rows: Sequence[dict], metric: str = "final") -> str:
    """Models (by size) × comparisons: Δ (points) with its 95 % interval, a dagger where Holm-significant;
    the last row the trend's slope (points per doubling of the weights) with its interval and p."""
    table = lead_table(rows, metric)
    fits = {(t["candidate"], t["baseline"], t["bits"]): t for t in trend_rows if t["metric"] == metric}

    def tex(s: str) -> str:
        return s.replace("_", r"\_").replace("&", r"\&").replace("%", r"\%")

    def interval(r: dict | None, key: str) -> str:
        if r is None or r[key] is None:
            return "--"
        body = f"{100 * r[key]:+.2f}"
        return body if r["ci_low"] is None else body + f" [{100 * r['ci_low']:+.2f}, {100 * r['ci_high']:+.2f}]"

    lines = [r"\begin{tabular}{lr" + "r" * len(table["columns"]) + "}", r"\hline",
             "Model & 1-bit weights & " + " & ".join(tex(f"{c} $-$ {b}, {bits}") for c, b, bits in table["columns"])
             + r" \\", r"\hline"]
    for row in table["rows"]:
        cells = [interval(r, "diff") + (r"$^\dagger$" if r is not None and r.get("significant") else "")
                 for r in row["cells"]]
        lines.append(f"{tex(row['model'])} & {'--' if row['weights'] is None else format(row['weights'], ',')} & "
                     + " & ".join(cells) + r" \\")
    trend_cells = []
    for key in table["columns"]:
        fit = fits.get(key)
        trend_cells.append(interval(fit, "slope") + ("" if fit is None or fit["p_value"] is None
                                                     else f", $p = {fit['p_value']:.3f}$"))
    lines += [r"\hline", "Trend per doubling & & " + " & ".join(trend_cells) + r" \\", r"\hline", r"\end{tabular}"]
    return "\n".join(lines) + "\n"
