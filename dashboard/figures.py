"""Pure functions from plain records (docs/CONTRACTS.md) to plotly figures.

Every trace carries ``meta={"kind": ...}`` so tests and pages can tell the estimator traces
("estimator") from the full-precision reference ("float") and the paper's points ("paper").
"""

from __future__ import annotations

import html
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from workers.records import DEFAULT_RANK_METRIC as DEFAULT_METRIC
from workers.records import FLOAT_BITS, FLOAT_LABEL, bit_config, config_label, config_sort_key, metric_field
from workers.records import trial_label as estimator_label

from .stats import mean_std

TEMPLATE = "plotly_white"
PAPER_SYMBOLS = {"aqe": "x-thin-open", "minw_aqe": "x-thin-open", "ste": "diamond-open", "float": "star-open"}

BitConfig = tuple[int, int]
#: what a figure or table shows per trial: metric name → (trial field, words for axes and captions)
METRICS = {
    "final": (metric_field("final"), "final test accuracy"),
    "selected": (metric_field("selected"), "test accuracy at the best validation epoch"),
}


def metric_title(metric: str) -> str:
    metric_field(metric)
    return METRICS[metric][1]


# ---------------------------------------------------------------- helpers (also used by pages)

def is_float_trial(trial: dict) -> bool:
    """Full-precision reference trial."""
    return trial.get("estimator") == FLOAT_LABEL


def text(value: object) -> str:
    """Escape user-derived text for plotly, which interprets a subset of HTML in labels."""
    return html.escape(str(value), quote=False)


def finished(trials: Iterable[dict], metric: str = DEFAULT_METRIC) -> list[dict]:
    """Trials that have a value of ``metric``."""
    field = metric_field(metric)
    return [t for t in trials if t.get(field) is not None]


def accuracies_by_config(trials: Iterable[dict], metric: str = DEFAULT_METRIC) -> dict[BitConfig, list[float]]:
    """The trials' ``metric`` accuracies grouped by bit configuration."""
    field = metric_field(metric)
    groups: dict[BitConfig, list[float]] = defaultdict(list)
    for t in finished(trials, metric):
        groups[bit_config(t.get("w_bits"), t.get("a_bits"))].append(float(t[field]))
    return groups


def _base_layout(fig: go.Figure, title: str | None, height: int) -> go.Figure:
    fig.update_layout(
        template=TEMPLATE, height=height, title=title and text(title),
        margin=dict(l=60, r=20, t=60 if title else 30, b=50),
        legend=dict(orientation="h", yanchor="bottom", y=1.02, x=0),
        font=dict(family="system-ui, -apple-system, Segoe UI, Roboto, sans-serif", size=13),
    )
    return fig


# ---------------------------------------------------------------- figures

def accuracy_vs_bits(trials: Iterable[dict], paper_points: Sequence[dict] | None = None,
                     title: str | None = None, metric: str = DEFAULT_METRIC) -> go.Figure:
    """Test accuracy (``metric``: final or validation-selected) against bit configuration, one
    trace per estimator (mean ± std over seeds).

    Float-reference trials (estimator "float") become a "full precision" marker at x = "float" and
    a dashed horizontal line (a layout shape). Paper points are drawn only at configurations that
    the trials have, one trace per paper estimator.
    """
    per_estimator: dict[str, list[dict]] = defaultdict(list)
    float_trials: list[dict] = []
    for t in finished(trials, metric):
        (float_trials if is_float_trial(t) else per_estimator[estimator_label(t)]).append(t)

    configs = {c for ts in per_estimator.values() for c in accuracies_by_config(ts, metric)}
    if float_trials:
        configs.add((FLOAT_BITS, FLOAT_BITS))
    order = sorted(configs, key=config_sort_key)
    categories = [config_label(c) for c in order]

    fig = go.Figure()
    for label in sorted(per_estimator):
        _add_mean_trace(fig, per_estimator[label], metric, text(label), {"kind": "estimator", "estimator": label})
    if float_trials:
        mean, _ = _add_mean_trace(fig, float_trials, metric, "full precision", {"kind": "float"},
                                  marker=dict(color="#222", symbol="square"))
        fig.add_hline(y=mean, line=dict(dash="dash", color="#555", width=1.5),
                      annotation_text=f"full precision {mean:.1%}", annotation_position="top left")
    for estimator, points in _paper_by_estimator(paper_points or (), set(order)).items():
        fig.add_trace(go.Scatter(
            x=[config_label(bit_config(p["w_bits"], p["a_bits"])) for p in points],
            y=[p["acc"] for p in points], mode="markers", name=f"paper: {text(estimator)}",
            meta={"kind": "paper", "estimator": estimator},
            marker=dict(symbol=PAPER_SYMBOLS.get(estimator, "circle-open"), size=11, color="#666",
                        line=dict(width=2)),
            hovertemplate="%{x}: %{y:.1%} (" + text(points[0].get("source", "paper")) + ")<extra>paper</extra>",
        ))
    _base_layout(fig, title, 460)
    fig.update_xaxes(title="bit configuration (W = weight bits, A = activation bits)",
                     type="category", categoryorder="array", categoryarray=categories)
    fig.update_yaxes(title=metric_title(metric), tickformat=".0%")
    return fig


def _add_mean_trace(fig: go.Figure, trials: list[dict], metric: str, name: str, meta: dict,
                    **style) -> tuple[float, float]:
    """Add a mean ± std scatter of ``metric`` over ``trials``; return the overall mean and std."""
    groups = accuracies_by_config(trials, metric)
    order = sorted(groups, key=config_sort_key)
    stats = [mean_std(groups[c]) for c in order]
    fig.add_trace(go.Scatter(
        x=[config_label(c) for c in order], y=[m for m, _ in stats],
        error_y=dict(type="data", array=[s for _, s in stats], visible=True, thickness=1.5, width=5),
        customdata=[[s, len(groups[c])] for c, (_, s) in zip(order, stats, strict=False)],
        mode="lines+markers", name=name, meta=meta,
        hovertemplate="%{x}: %{y:.2%} ± %{customdata[0]:.2%} (n=%{customdata[1]})",
        **style,
    ))
    return mean_std([a for c in order for a in groups[c]])


def _paper_by_estimator(points: Iterable[dict], configs: set[BitConfig]) -> dict[str, list[dict]]:
    """Paper points at the given configurations, grouped by estimator in config order."""
    grouped: dict[str, list[dict]] = defaultdict(list)
    for p in sorted(points, key=lambda p: config_sort_key(bit_config(p["w_bits"], p["a_bits"]))):
        if bit_config(p["w_bits"], p["a_bits"]) in configs:
            grouped[p["estimator"]].append(p)
    return grouped


def heatmap_matrix(trials: Iterable[dict], label: str,
                   metric: str = DEFAULT_METRIC) -> tuple[list[int], list[int], list[list[float | None]]]:
    """(weight bits, activation bits, z) with z[i][j] the mean accuracy at (w[i], a[j]) or None."""
    groups = accuracies_by_config((t for t in trials if estimator_label(t) == label), metric)
    w_bits = sorted({w for w, _ in groups})
    a_bits = sorted({a for _, a in groups})
    z = [[mean_std(groups[(w, a)])[0] if (w, a) in groups else None for a in a_bits] for w in w_bits]
    return w_bits, a_bits, z


def color_range(values: Iterable[float | None], pad: float = 0.005) -> tuple[float, float]:
    """(min, max) of the non-missing values, widened when they coincide (for a shared colour scale)."""
    present = [v for v in values if v is not None]
    if not present:
        return 0.0, 1.0
    low, high = min(present), max(present)
    return (low - pad, high + pad) if high - low < pad else (low, high)


def bits_heatmap(trials: Iterable[dict], estimator_label: str, title: str | None = None,
                 zrange: tuple[float, float] | None = None, metric: str = DEFAULT_METRIC) -> go.Figure:
    """Weight bits × activation bits heat map of one estimator's mean test accuracy (``metric``).

    ``zrange`` fixes the colour scale (pass one range to compare estimators side by side).
    """
    w_bits, a_bits, z = heatmap_matrix(trials, estimator_label, metric)
    zmin, zmax = zrange or color_range(v for row in z for v in row)
    fig = go.Figure(go.Heatmap(
        x=[f"A{a}" for a in a_bits], y=[f"W{w}" for w in w_bits], z=z,
        text=[["" if v is None else f"{v:.1%}" for v in row] for row in z],
        texttemplate="%{text}", colorscale="YlGnBu", zmin=zmin, zmax=zmax,
        colorbar=dict(tickformat=".1%", thickness=12),
        hovertemplate="%{y} %{x}: %{z:.2%}<extra></extra>", xgap=2, ygap=2,
        meta={"kind": "heatmap", "estimator": estimator_label},
    ))
    _base_layout(fig, title if title is not None else estimator_label, 320)
    fig.update_xaxes(title="activation bits", type="category", showgrid=False)
    fig.update_yaxes(title="weight bits", type="category", showgrid=False)
    return fig


#: the name of the validation accuracy of the training forward (``val_acc_soft``) in figures
SOFT_VAL_NAME = "val (training forward)"


def training_curves(trial: dict) -> go.Figure:
    """Per-epoch loss, accuracies, learning rate and schedule values (AQE's α etc.) of one trial.

    Where the trial recorded ``val_acc_soft`` (an estimator whose training forward differs from
    eval's, e.g. AQE's soft mix), the accuracy panel also draws it, dashed, as "val (training
    forward)" beside the hard ``val_acc``: the gap closes as α → 1."""
    metrics = sorted(trial.get("metrics") or [], key=lambda m: m["epoch"])
    epochs = [m["epoch"] for m in metrics]
    fig = make_subplots(rows=3, cols=2, subplot_titles=("Training loss", "Accuracy", "Learning rate",
                                                        "Schedule", "Weight flips (level changes per epoch)"),
                        horizontal_spacing=0.1, vertical_spacing=0.12)

    def series(key: str, name: str, row: int, col: int, getter=None, **line) -> None:
        values = [getter(m) if getter else m.get(key) for m in metrics]
        if any(v is not None for v in values):
            fig.add_trace(go.Scatter(x=epochs, y=values, mode="lines+markers", name=text(name), line=line,
                                     meta={"kind": "metric", "key": key}), row=row, col=col)

    series("train_loss", "train loss", 1, 1)
    for key in ("train_acc", "val_acc", "test_acc"):
        series(key, key.replace("_acc", " acc"), 1, 2)
    series("val_acc_soft", SOFT_VAL_NAME, 1, 2, dash="dash")
    series("lr", "learning rate", 2, 1)
    schedule_keys = sorted({k for m in metrics for k in (m.get("schedule") or {})})
    for key in schedule_keys:
        series(f"schedule.{key}", key, 2, 2, getter=lambda m, k=key: (m.get("schedule") or {}).get(k))
    series("weight_flips", "weight flips", 3, 1)
    _base_layout(fig, None, 820)
    fig.update_layout(margin=dict(t=80), legend=dict(y=1.1))
    fig.update_xaxes(dtick=max(1, math.ceil(len(epochs) / 10)))
    fig.update_xaxes(title="epoch", row=3)
    fig.update_xaxes(title="epoch", row=2, col=2)
    fig.update_yaxes(tickformat=".0%", row=1, col=2)
    fig.update_yaxes(tickformat=".1%", row=3, col=1)
    fig.update_yaxes(exponentformat="e", row=2, col=1)
    return fig
