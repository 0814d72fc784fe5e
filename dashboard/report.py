"""A run's report as a self-contained folder: RESULTS.md, figures (PNG + HTML), LaTeX, spec, machine.

Pure over plain records (docs/CONTRACTS.md): the service reads them from the database and
calls :func:`write_report`; nothing here knows SQL.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import plotly.graph_objects as go
import plotly.io as pio

from .figures import (
    FLOAT_LABEL,
    accuracy_vs_bits,
    bit_config,
    config_label,
    config_sort_key,
    estimator_label,
)
from .paper_results import paper_points
from .stats import mean, mean_std, paired_comparisons, paired_difference

BASELINES = ("ste", "clipped_ste")
CANDIDATES = ("aqe", "minw_aqe")  # the paper's estimator, and its named method
#: a trial "fell" when its last epoch is this far below its validation-selected epoch
LATE_DROP = 0.01


def mean_curves(epoch_rows: list[dict], metric: str = "test_acc") -> go.Figure:
    """Mean ``metric`` per epoch over seeds: one line per estimator, one panel per bit config."""
    from plotly.subplots import make_subplots

    series: dict[tuple, dict[str, dict[int, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in epoch_rows:
        if r.get(metric) is not None:
            series[bit_config(r["w_bits"], r["a_bits"])][r["estimator_label"]][r["epoch"]].append(r[metric])
    configs = sorted(series, key=config_sort_key)
    labels = sorted({label for by_label in series.values() for label in by_label})
    fig = make_subplots(rows=1, cols=max(len(configs), 1), shared_yaxes=True,
                        subplot_titles=[config_label(c) for c in configs])
    shown: set[str] = set()
    for col, config in enumerate(configs, start=1):
        for label, by_epoch in sorted(series[config].items()):
            epochs = sorted(by_epoch)
            fig.add_trace(go.Scatter(x=epochs, y=[mean(v) for v in (by_epoch[e] for e in epochs)],
                                     mode="lines", name=label, legendgroup=label, showlegend=label not in shown,
                                     line=dict(color=_color(labels.index(label))), meta={"kind": "estimator"}),
                          row=1, col=col)
            shown.add(label)
        fig.update_xaxes(title="epoch", row=1, col=col)
    fig.update_yaxes(title=metric.replace("_", " "), tickformat=".0%", row=1, col=1)
    fig.update_layout(template="plotly_white", height=520, width=max(520, 460 * len(configs)),
                      title=f"{metric.replace('_', ' ')} by epoch (mean over seeds)")
    return fig


def _color(i: int) -> str:
    import plotly.colors

    palette = plotly.colors.qualitative.Dark24
    return palette[i % len(palette)]


def _pct(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{100 * x:.{digits}f}"


def leaderboard_markdown(rows: list[dict], selected: list[dict] | None = None) -> str:
    """One table per bit configuration: rank, estimator, mean ± std, n, 95% interval (in %) of the
    final accuracy, and beside them the validation-selected accuracy's mean ± std and rank when
    ``selected`` (the same leaderboard by ``metric=selected``) is given."""
    out = []
    by_config: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        by_config[bit_config(r["w_bits"], r["a_bits"])].append(r)
    chosen = {(r["w_bits"], r["a_bits"], r["estimator_label"]): r for r in selected or []}
    extra_head, extra_rule = (" selected mean ± std (%) | selected rank |", "---:|---:|") if selected else ("", "")
    for config in sorted(by_config, key=config_sort_key):
        out += [f"### {config_label(config)}", "",
                f"| rank | estimator | mean ± std (%) | n | 95% interval (%) |{extra_head}",
                f"|---:|---|---:|---:|---|{extra_rule}"]
        for r in sorted(by_config[config], key=lambda r: r["rank"]):
            ci = "–" if r["ci_low"] is None else f"[{_pct(r['ci_low'])}, {_pct(r['ci_high'])}]"
            best = " **(best)**" if r.get("best") and len(by_config[config]) > 1 else ""
            line = (f"| {r['rank']} | `{r['estimator_label']}`{best} | {_pct(r['mean'])} ± {_pct(r['std'])} "
                    f"| {r['n']} | {ci} |")
            if selected:
                other = chosen.get((r["w_bits"], r["a_bits"], r["estimator_label"]))
                line += (" – | – |" if other is None else
                         f" {_pct(other['mean'])} ± {_pct(other['std'])} | {other['rank']} |")
            out.append(line)
        out.append("")
    return "\n".join(out)


def _last_epoch(t: dict) -> float | None:
    """The trial's test accuracy after its last epoch (before any BatchNorm re-estimation)."""
    return (t.get("final") or {}).get("last_epoch_test_acc", t.get("final_test_acc"))


def late_drops(trials: list[dict], points: float = LATE_DROP) -> list[dict]:
    """Trials whose last epoch's test accuracy is more than ``points`` below their selected epoch's."""
    return [t for t in trials if _last_epoch(t) is not None and t.get("selected_test_acc") is not None
            and _last_epoch(t) < t["selected_test_acc"] - points]


def late_drop_markdown(trials: list[dict]) -> str:
    """How many trials lost more than a point after their best validation epoch, and which."""
    scored = [t for t in trials if _last_epoch(t) is not None and t.get("selected_test_acc") is not None]
    if not scored:
        return "_No trial has a validation-selected accuracy (no validation split, or trained before it existed)._\n"
    drops = late_drops(scored)
    text = (f"**{len(drops)} of {len(scored)} trials** ended their last epoch more than {100 * LATE_DROP:.0f} point "
            f"below the test accuracy of their best validation epoch.\n")
    if drops:
        text += "\n| trial | last epoch (%) | selected (%) | selected epoch |\n|---|---:|---:|---:|\n" + "".join(
            f"| `{t['key']}` | {_pct(_last_epoch(t))} | {_pct(t['selected_test_acc'])} | {t.get('selected_epoch')} |\n"
            for t in drops)
    return text


def reestimation_markdown(trials: list[dict]) -> str:
    """Last-epoch test accuracy without and with BatchNorm re-estimation, per estimator and bits:
    means, spreads and the paired difference over the same trials (same weights, two statistics)."""
    pairs: dict[tuple, list[tuple[float, float]]] = defaultdict(list)
    for t in trials:
        final = t.get("final") or {}
        if final.get("bn_reestimated") and final.get("last_epoch_test_acc") is not None \
                and t.get("final_test_acc") is not None:
            key = (bit_config(t["w_bits"], t["a_bits"]), estimator_label(t))
            pairs[key].append((final["last_epoch_test_acc"], t["final_test_acc"]))
    if not pairs:
        return ""
    lines = ["| bits | estimator | n | last epoch, running statistics (%) | re-estimated (%) | "
             "Δ (points) | 95% interval |", "|---|---|---:|---:|---:|---:|---|"]
    for (config, label) in sorted(pairs, key=lambda k: (config_sort_key(k[0]), k[1])):
        before, after = zip(*pairs[(config, label)])
        d = paired_difference(list(after), list(before))
        ci = "–" if d["ci_low"] is None else f"[{100 * d['ci_low']:+.2f}, {100 * d['ci_high']:+.2f}]"
        (mb, sb), (ma, sa) = mean_std(before), mean_std(after)
        lines.append(f"| {config_label(config)} | `{label}` | {len(before)} | {_pct(mb)} ± {_pct(sb)} "
                     f"| {_pct(ma)} ± {_pct(sa)} | {100 * d['diff']:+.2f} | {ci} |")
    return ("## BatchNorm re-estimation\n\nThe same trained weights evaluated twice: with the BatchNorm "
            "statistics that training left (running averages that lag behind the last steps) and with "
            "statistics recomputed over the training set after the last epoch. The final accuracy above "
            "is the re-estimated one.\n\n" + "\n".join(lines) + "\n")


def paired_markdown(rows: list[dict]) -> str:
    """One row per comparison: Δ = candidate − baseline with its paired interval and test, and the
    accuracy it compares (``metric``: final or selected)."""
    lines = ["| candidate | baseline | bits | seeds | Δ accuracy (points) | 95% interval | p | significant (p < 0.05) "
             "| accuracy |", "|---|---|---|---|---:|---|---:|---|---|"]
    for r in rows:
        ci = "–" if r["ci_low"] is None else f"[{100 * r['ci_low']:+.2f}, {100 * r['ci_high']:+.2f}]"
        p = "–" if r["p_value"] is None else f"{r['p_value']:.3f}"
        lines.append(f"| `{r['candidate']}` | `{r['baseline']}` | {r['bits']} | {','.join(map(str, r['seeds']))} "
                     f"| {100 * r['diff']:+.2f} | {ci} | {p} | {'yes' if r['significant'] else 'no'} "
                     f"| {r.get('metric', 'final')} |")
    return "\n".join(lines)


def latex_table(rows: list[dict]) -> str:
    """Estimators × bit configurations, mean ± std test accuracy (%), best per column in bold."""
    configs = sorted({bit_config(r["w_bits"], r["a_bits"]) for r in rows}, key=config_sort_key)
    labels = sorted({r["estimator_label"] for r in rows})
    cell = {(r["estimator_label"], bit_config(r["w_bits"], r["a_bits"])): r for r in rows}

    def tex(s: str) -> str:
        return s.replace("\\", r"\textbackslash{}").replace("_", r"\_").replace("&", r"\&").replace("%", r"\%") \
            .replace("#", r"\#").replace("{", r"\{").replace("}", r"\}").replace("$", r"\$")

    lines = [r"\begin{tabular}{l" + "r" * len(configs) + "}", r"\hline",
             "Estimator & " + " & ".join(tex(config_label(c)) for c in configs) + r" \\", r"\hline"]
    for label in labels:
        cells = []
        for c in configs:
            r = cell.get((label, c))
            if r is None:
                cells.append("--")
                continue
            body = f"{100 * r['mean']:.2f}" + (rf" $\pm$ {100 * r['std']:.2f}" if r["std"] is not None else "")
            cells.append(rf"\textbf{{{body}}}" if r.get("best") else body)
        lines.append(tex(label) + " & " + " & ".join(cells) + r" \\")
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
    # the STE baselines where the run has them; else (a methods study) every other system at its bits
    baselines = [b for b in BASELINES if b in labels] or [
        lab for lab in labels if lab not in candidates and lab != FLOAT_LABEL]
    pairs = [{**p, "metric": "final"} for p in paired_comparisons(trials, candidates, baselines)]
    if selected_leaderboard:
        pairs += [{**p, "metric": "selected"} for p in paired_comparisons(trials, candidates, baselines, "selected")]

    figures = {
        "accuracy_vs_bits": accuracy_vs_bits(trials, paper_points(run["dataset"], run["model"]),
                                             title=f"{run['dataset']} / {run['model']}: final test accuracy"),
        "training_curves": mean_curves(epoch_rows, "test_acc"),
    }
    figures["accuracy_vs_bits"].update_layout(legend=dict(orientation="h", yanchor="top", y=-0.22, x=0),
                                              margin=dict(t=70, b=150))
    png_note = ""
    for name, fig in figures.items():
        files[f"{name}.html"] = out / f"{name}.html"
        fig.write_html(files[f"{name}.html"], include_plotlyjs=True, full_html=True)
    if png:
        pngs = {f"{name}.png": out / f"{name}.png" for name in figures}
        try:  # one Chromium for all figures: half the time and CPU of one per figure
            pio.write_images(list(figures.values()), list(pngs.values()),
                             width=[f.layout.width or 900 for f in figures.values()],
                             height=[f.layout.height or 560 for f in figures.values()])
            files.update(pngs)
        except Exception as exc:  # kaleido or Chromium missing: the HTML figures still stand
            png_note = f"\n> PNG figures were not written ({type(exc).__name__}: {exc}); see the HTML files.\n"

    files["leaderboard.tex"] = out / "leaderboard.tex"
    files["leaderboard.tex"].write_text(latex_table(leaderboard))
    files["spec.json"] = out / "spec.json"
    files["spec.json"].write_text(json.dumps(run["spec"], indent=2, sort_keys=True) + "\n")
    files["environment.json"] = out / "environment.json"
    files["environment.json"].write_text(json.dumps(environment, indent=2, sort_keys=True) + "\n")

    fp = [t["final_test_acc"] for t in trials if t.get("estimator") == "float" and t.get("final_test_acc") is not None]
    fp_line = f"Full-precision reference: {_pct(mean_std(fp)[0])} ± {_pct(mean_std(fp)[1])} % (n = {len(fp)}).\n" if fp else ""
    images = "".join(f"![{n}]({n}.png)\n\n" for n in figures if f"{n}.png" in files)
    md = f"""# {run['name']}

Run {run['id']} · `{run['dataset']}` / `{run['model']}` · status **{run['status']}** ·
{len(trials)} finished trials of {run.get('trial_count', '?')} · created {run.get('created_at', '')}

Ranked by the final test accuracy: after the last epoch (and after BatchNorm re-estimation when
the recipe asks for it), measured with hard quantizers, mean over seeds. Beside it, the
*selected* accuracy: the test accuracy of the epoch with the best validation accuracy, chosen on
validation, never on test. Every number below is read from the bitbench database for this run.

{fp_line}
## Leaderboard per bit configuration: final and validation-selected

{leaderboard_markdown(leaderboard, selected_leaderboard)}
### Late drops

{late_drop_markdown(trials)}
{reestimation_markdown(trials)}
## Paired comparison over the same seeds

Δ = candidate − baseline in accuracy points; paired t-interval and paired t-test per bit configuration.
With few seeds the test has little power: an interval that spans 0 means "not shown", not "equal".

{paired_markdown(pairs) if pairs else "_No candidate/baseline pairs in this run._"}

## Figures

{images}Interactive: [accuracy_vs_bits.html](accuracy_vs_bits.html), [training_curves.html](training_curves.html).
{png_note}
## Reproduce

The exact spec is in [spec.json](spec.json); submit it with `bitbench submit spec.json`.
LaTeX table: [leaderboard.tex](leaderboard.tex). Versions and machine: [environment.json](environment.json)
(`{environment.get('python', '')}`, torch `{environment.get('torch', '')}`, {environment.get('machine', '')}).
"""
    files["RESULTS.md"] = out / "RESULTS.md"
    files["RESULTS.md"].write_text(md)
    return files
