"""A run's report as a self-contained folder: RESULTS.md, figures (PNG + HTML), LaTeX, spec, machine.

Pure over plain records (docs/CONTRACTS.md): the service reads them from the database and
calls :func:`write_report`; nothing here knows SQL.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import plotly.graph_objects as go
import plotly.io as pio
from jinja2 import Environment, PackageLoader, StrictUndefined

from . import capacity
from .figures import (
    FLOAT_LABEL,
    SOFT_VAL_NAME,
    accuracy_vs_bits,
    bit_config,
    config_label,
    config_sort_key,
    estimator_label,
)
from .paper_results import paper_points
from .stats import ALPHA, POWER, adjust_family, mean, mean_std, paired_difference

BASELINES = ("ste", "clipped_ste")
CANDIDATES = ("aqe", "minw_aqe")  # the paper's estimator, and its named method
#: the fewest seeds of a study's paired comparisons before its report calls it a pilot
MIN_SEEDS = 5
#: a trial "fell" when its last epoch is this far below its validation-selected epoch
LATE_DROP = 0.01
PLOTLY_JS = "plotly.min.js"  # the figures' pages load it from their own folder (plotly's include_plotlyjs="directory")


def _by_epoch(epoch_rows: list[dict], metric: str) -> dict[tuple, dict[str, dict[int, list[float]]]]:
    """{bit config: {estimator label: {epoch: [``metric`` of each seed]}}} over the rows that have it."""
    series: dict[tuple, dict[str, dict[int, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in epoch_rows:
        if r.get(metric) is not None:
            series[bit_config(r["w_bits"], r["a_bits"])][r["estimator_label"]][r["epoch"]].append(r[metric])
    return series


def mean_curves(epoch_rows: list[dict], metric: str = "test_acc", dashed: str | None = None,
                dashed_name: str = SOFT_VAL_NAME) -> go.Figure:
    """Mean ``metric`` per epoch over seeds: one line per estimator, one panel per bit config; with
    ``dashed`` (e.g. ``val_acc_soft``) also that metric's mean, dashed in the estimator's colour and
    named ``label: dashed_name``, for the estimators that recorded it."""
    from plotly.subplots import make_subplots

    solid, second = _by_epoch(epoch_rows, metric), _by_epoch(epoch_rows, dashed) if dashed else {}
    configs = sorted(solid, key=config_sort_key)
    labels = sorted({label for by_label in solid.values() for label in by_label})
    fig = make_subplots(rows=1, cols=max(len(configs), 1), shared_yaxes=True,
                        subplot_titles=[config_label(c) for c in configs])
    shown: set[str] = set()
    for col, config in enumerate(configs, start=1):
        lines = [(label, by_epoch, label, "solid") for label, by_epoch in sorted(solid[config].items())]
        lines += [(label, by_epoch, f"{label}: {dashed_name}", "dash")
                  for label, by_epoch in sorted(second.get(config, {}).items()) if label in labels]
        for label, by_epoch, name, dash in lines:
            epochs = sorted(by_epoch)
            fig.add_trace(go.Scatter(x=epochs, y=[mean(v) for v in (by_epoch[e] for e in epochs)],
                                     mode="lines", name=name, legendgroup=name, showlegend=name not in shown,
                                     line=dict(color=_color(labels.index(label)), dash=dash),
                                     meta={"kind": "estimator" if dash == "solid" else "soft", "estimator": label}),
                          row=1, col=col)
            shown.add(name)
        fig.update_xaxes(title="epoch", row=1, col=col)
    fig.update_yaxes(title=metric.replace("_", " "), tickformat=".0%", row=1, col=1)
    what = metric.replace("_", " ") + (f" ({dashed_name}: dashed)" if second else "")
    fig.update_layout(template="plotly_white", height=520, width=max(520, 460 * len(configs)),
                      title=f"{what} by epoch (mean over seeds)")
    return fig


def _color(i: int) -> str:
    import plotly.colors

    palette = plotly.colors.qualitative.Dark24
    return palette[i % len(palette)]


def _pct(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{100 * x:.{digits}f}"


def _points(x: float) -> str:
    """A difference of fractions in signed percentage points: ``+2.00``."""
    return f"{100 * x:+.2f}"


def _number(x: float | None, spec: str) -> str:
    """``x`` in the format ``spec`` (``".3f"``), or an en dash for None."""
    return "–" if x is None else format(x, spec)


# RESULTS.md: Markdown, no HTML escaping (record text is written as it is, as it always was)
_templates = Environment(loader=PackageLoader("dashboard"), autoescape=False, trim_blocks=True, lstrip_blocks=True,
                         keep_trailing_newline=True, undefined=StrictUndefined)
_templates.filters.update(pct=_pct, points=_points, number=_number, log2=math.log2)


def leaderboard_tables(rows: list[dict], selected: list[dict] | None = None) -> list[dict]:
    """One table per bit configuration (in config order) and protocol (a run's named method may train
    under a protocol of its own; the title then names it): ``{"bits", "rows"}``, rows by rank, each
    with ``best`` (best of more than one) and ``selected``, its row in the leaderboard by the
    validation-selected accuracy (None where it has none or ``selected`` is not given)."""
    by_config: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        by_config[(bit_config(r["w_bits"], r["a_bits"]), r.get("protocol_label", ""))].append(r)
    several = len({label for _, label in by_config}) > 1
    chosen = {(r.get("protocol"), r["w_bits"], r["a_bits"], r["estimator_label"]): r for r in selected or []}
    return [{"bits": config_label(config) + (f" · {label}" if several else ""),
             "rows": [{**r, "best": bool(r.get("best")) and len(by_config[(config, label)]) > 1,
                       "selected": chosen.get((r.get("protocol"), r["w_bits"], r["a_bits"], r["estimator_label"]))}
                      for r in sorted(by_config[(config, label)], key=lambda r: r["rank"])]}
            for config, label in sorted(by_config, key=lambda k: (config_sort_key(k[0]), k[1]))]


def _last_epoch(t: dict) -> float | None:
    """The trial's test accuracy after its last epoch (before any BatchNorm re-estimation)."""
    return (t.get("final") or {}).get("last_epoch_test_acc", t.get("final_test_acc"))


def late_drops(trials: list[dict], points: float = LATE_DROP) -> list[dict]:
    """Trials whose last epoch's test accuracy is more than ``points`` below their selected epoch's."""
    return [t for t in trials if _last_epoch(t) is not None and t.get("selected_test_acc") is not None
            and _last_epoch(t) < t["selected_test_acc"] - points]


def late_drop_summary(trials: list[dict]) -> dict:
    """``{"scored", "drops"}``: how many trials have both a last-epoch and a selected accuracy, and
    which of them lost more than ``LATE_DROP`` after their best validation epoch (with ``last_epoch``)."""
    scored = [t for t in trials if _last_epoch(t) is not None and t.get("selected_test_acc") is not None]
    return {"scored": len(scored), "drops": [{**t, "last_epoch": _last_epoch(t)} for t in late_drops(scored)]}


def reestimation_rows(trials: list[dict], by_model: bool = False) -> list[dict]:
    """Last-epoch test accuracy without (``before``) and with (``after``) BatchNorm re-estimation, per
    bit configuration and estimator (and model, ``by_model``: a report over several model sizes): means ±
    spreads and the paired difference over the same trials (same weights, two statistics)."""
    pairs: dict[tuple, list[tuple[float, float]]] = defaultdict(list)
    for t in trials:
        final = t.get("final") or {}
        if final.get("bn_reestimated") and final.get("last_epoch_test_acc") is not None \
                and t.get("final_test_acc") is not None:
            model = (t.get("model_label") or "") if by_model else ""
            key = (model, bit_config(t["w_bits"], t["a_bits"]), estimator_label(t))
            pairs[key].append((final["last_epoch_test_acc"], t["final_test_acc"]))
    rows = []
    for (model, config, label) in sorted(pairs, key=lambda k: (k[0], config_sort_key(k[1]), k[2])):
        before, after = zip(*pairs[(model, config, label)], strict=True)
        bits = f"{model} · {config_label(config)}" if model else config_label(config)  # per model, as paired tests
        rows.append({"bits": bits, "estimator": label, "n": len(before),
                     "before": mean_std(before), "after": mean_std(after),
                     **paired_difference(list(after), list(before))})
    return rows


def latex_table(rows: list[dict]) -> str:
    """Estimators (with their quantizer grid) × bit configurations, mean ± std test accuracy (%), best per
    column in bold."""
    configs = sorted({bit_config(r["w_bits"], r["a_bits"]) for r in rows}, key=config_sort_key)
    labels = sorted({r["estimator_label"] for r in rows})
    grid = {r["estimator_label"]: r.get("grid") for r in rows}  # an estimator label names its grid
    cell = {(r["estimator_label"], bit_config(r["w_bits"], r["a_bits"])): r for r in rows}

    def tex(s: str) -> str:
        return s.replace("\\", r"\textbackslash{}").replace("_", r"\_").replace("&", r"\&").replace("%", r"\%") \
            .replace("#", r"\#").replace("{", r"\{").replace("}", r"\}").replace("$", r"\$")

    lines = [r"\begin{tabular}{ll" + "r" * len(configs) + "}", r"\hline",
             "Estimator & Grid & " + " & ".join(tex(config_label(c)) for c in configs) + r" \\", r"\hline"]
    for label in labels:
        cells = []
        for c in configs:
            r = cell.get((label, c))
            if r is None:
                cells.append("--")
                continue
            body = f"{100 * r['mean']:.2f}" + (rf" $\pm$ {100 * r['std']:.2f}" if r["std"] is not None else "")
            cells.append(rf"\textbf{{{body}}}" if r.get("best") else body)
        lines.append(tex(label) + " & " + (tex(grid[label]) if grid[label] else "--") + " & " + " & ".join(cells)
                     + r" \\")
    lines += [r"\hline", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def write_report(out_dir: str | Path, *, run: dict, leaderboard: list[dict], trials: list[dict],
                 epoch_rows: list[dict], environment: dict, candidates: list[str] | None = None,
                 png: bool = True, selected_leaderboard: list[dict] | None = None) -> dict[str, Path]:
    """Write the report folder; return {name: path}. ``leaderboard`` ranks by the final accuracy,
    ``selected_leaderboard`` (optional) by the validation-selected one. PNGs need kaleido +
    Chromium (skipped with a note if absent)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    labels = sorted({r["estimator_label"] for r in leaderboard})
    candidates = candidates or [lab for lab in labels if lab.split("[")[0] in CANDIDATES]
    # the STE baselines (on each grid they ran on) where the run has them; else (a methods study) every other
    # system at its bits. paired_comparisons pairs a candidate only with a baseline on its own grid.
    # (a baseline: an STE estimator with no parameter but its grid, not a named method built on it)
    baselines = sorted({t["estimator_label"] for t in trials if t.get("estimator") in BASELINES and t["estimator_label"]
                        in (t["estimator"], f"{t['estimator']}[grid={(t.get('estimator_params') or {}).get('grid')}]")}
                       & set(labels)) or [
        lab for lab in labels if lab not in candidates and lab != FLOAT_LABEL]
    # one family of tests per accuracy: Holm's adjustment runs over all of the report's comparisons of it
    # seeds pair within a model (a report over several runs, one per model size, compares each model's own)
    families = {metric: adjust_family(capacity.comparisons(trials, candidates, baselines, metric))
                for metric in (("final", "selected") if selected_leaderboard else ("final",))}
    pairs = [{**p, "metric": metric} for metric, rows in families.items() for p in rows]

    figures: dict[str, go.Figure] = {}
    section = None
    if capacity.covers_sizes(trials):  # at least two model sizes: AQE's lead against capacity, the first figure
        trend_rows = capacity.trends(pairs)
        figures["aqe_lead_vs_capacity"] = capacity.lead_figure(pairs, trend_rows)
        files["capacity.tex"] = out / "capacity.tex"
        files["capacity.tex"].write_text(capacity.latex_table(pairs, trend_rows))
        section = {"table": capacity.lead_table(pairs), "trends": trend_rows, "paper": capacity.paper_differences(),
                   "paper_trend": capacity.paper_trend(), "paper_name": capacity.PAPER_NAME}
    models = sorted({t["model_label"] for t in trials if t.get("model_label")})
    by_model = len(models) > 1  # a report over several model sizes: its tables name each row's model
    for model in models if by_model else [None]:  # several models: each one's figures, suffixed by it
        figures.update(_run_figures(run, [t for t in trials if model is None or t.get("model_label") == model],
                                    [r for r in epoch_rows if model is None or r.get("model_label") == model],
                                    model))
    png_error = None
    for name, fig in figures.items():  # plotly.js once, beside the pages that load it (no CDN, one copy a folder)
        files[f"{name}.html"] = out / f"{name}.html"
        fig.write_html(files[f"{name}.html"], include_plotlyjs="directory", full_html=True)
    if figures:
        files[PLOTLY_JS] = out / PLOTLY_JS
    if png:
        pngs = {f"{name}.png": out / f"{name}.png" for name in figures}
        try:  # one Chromium for all figures: half the time and CPU of one per figure
            pio.write_images(list(figures.values()), list(pngs.values()),
                             width=[f.layout.width or 900 for f in figures.values()],
                             height=[f.layout.height or 560 for f in figures.values()])
            files.update(pngs)
        except Exception as exc:  # kaleido or Chromium missing: the HTML figures still stand
            png_error = f"{type(exc).__name__}: {exc}"

    files["leaderboard.tex"] = out / "leaderboard.tex"
    by_protocol: dict[str, list[dict]] = defaultdict(list)
    for r in leaderboard:
        by_protocol[r.get("protocol_label", "")].append(r)
    files["leaderboard.tex"].write_text(latex_table(leaderboard) if len(by_protocol) < 2 else "\n".join(
        f"% {label}\n{latex_table(rows)}" for label, rows in sorted(by_protocol.items())))
    files["spec.json"] = out / "spec.json"
    files["spec.json"].write_text(json.dumps(run["spec"], indent=2, sort_keys=True) + "\n")
    files["environment.json"] = out / "environment.json"
    files["environment.json"].write_text(json.dumps(environment, indent=2, sort_keys=True) + "\n")

    fp: dict[str | None, list[float]] = defaultdict(list)  # per model in a report over several model sizes
    for t in trials:
        if t.get("estimator") == "float" and t.get("final_test_acc") is not None:
            fp[t.get("model_label")].append(t["final_test_acc"])
    md = _templates.get_template("results.md").render(
        run=run, trials=trials, environment=environment, pairs=pairs, alpha=ALPHA, power=POWER, min_seeds=MIN_SEEDS,
        family_sizes={metric: sum(r["p_value"] is not None for r in rows) for metric, rows in families.items()},
        full_precision=[{"model": model, "n": len(accs), "mean_std": mean_std(accs)}
                        for model, accs in sorted(fp.items(), key=lambda kv: str(kv[0]))],
        leaderboard=leaderboard_tables(leaderboard, selected_leaderboard), with_selected=bool(selected_leaderboard),
        late=late_drop_summary(trials), reestimation=reestimation_rows(trials, by_model),
        by_model=by_model,
        images=[n for n in figures if f"{n}.png" in files], interactive=list(figures), png_error=png_error,
        capacity=section)
    files["RESULTS.md"] = out / "RESULTS.md"
    files["RESULTS.md"].write_text(md)
    return files


def _run_figures(run: dict, trials: list[dict], epoch_rows: list[dict], model: str | None) -> dict[str, go.Figure]:
    """Accuracy against bits and the mean training (and, with a soft training forward, validation) curves of
    ``trials``; with ``model`` (one of several in the report) titled by it and named ``<figure>_<model>``."""
    name = run["model"] if model is None else model
    suffix = "" if model is None else "_" + "_".join(model.split())
    figures = {f"accuracy_vs_bits{suffix}": accuracy_vs_bits(
        trials, paper_points(run["dataset"], name if model is None else model.split()[0]),
        title=f"{run['dataset']} / {name}: final test accuracy")}
    figures[f"accuracy_vs_bits{suffix}"].update_layout(legend=dict(orientation="h", yanchor="top", y=-0.22, x=0),
                                                       margin=dict(t=70, b=150))
    curves = {"training_curves": mean_curves(epoch_rows, "test_acc")}
    if any(r.get("val_acc_soft") is not None for r in epoch_rows):  # a soft training forward (AQE): the gap closing
        curves["validation_curves"] = mean_curves(epoch_rows, "val_acc", dashed="val_acc_soft")
    for key, fig in curves.items():
        if model is not None:
            fig.update_layout(title_text=f"{model}: {fig.layout.title.text}")
        figures[key + suffix] = fig
    return figures
