"""Server-rendered HTML pages built from plain records (no web framework needed here).

Every piece of record text goes through :func:`esc` (``html.escape``). Figures are embedded as
JSON (``<script type="application/json">``) and drawn by ``static/dashboard.js`` with the
plotly.js bundle that the router serves from the installed plotly package.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from html import escape as esc
from importlib import resources
from urllib.parse import urlencode

import plotly
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from . import figures
from .paper_results import paper_points

ACTIVE_STATUSES = ("queued", "running")
KNOWN_STATUSES = ("queued", "running", "done", "failed", "cancelled")
REFRESH_SECONDS = 5
RUNS_PER_PAGE = 50
STATIC_TYPES = {"dashboard.css": "text/css; charset=utf-8",
                "dashboard.js": "text/javascript; charset=utf-8"}


# ---------------------------------------------------------------- static assets

@lru_cache(maxsize=None)
def static_asset(name: str) -> tuple[bytes, str]:
    """(content, media type) of a file in ``dashboard/static`` or of the plotly.js bundle."""
    if name == "plotly.min.js":
        return get_plotlyjs().encode("utf-8"), "text/javascript; charset=utf-8"
    if name not in STATIC_TYPES:
        raise KeyError(name)
    return resources.files("dashboard").joinpath("static", name).read_bytes(), STATIC_TYPES[name]


@lru_cache(maxsize=None)
def asset_version(name: str) -> str:
    """Cache-busting token for a static asset (the plotly version for the bundle)."""
    if name == "plotly.min.js":
        return plotly.__version__
    return hashlib.sha256(static_asset(name)[0]).hexdigest()[:12]


# ---------------------------------------------------------------- urls

def with_query(path: str, **params: object) -> str:
    """``path`` plus the non-empty ``params`` as a query string."""
    query = urlencode({k: v for k, v in params.items() if v not in (None, "")})
    return f"{path}?{query}" if query else path


@dataclass(frozen=True)
class Urls:
    """Paths of the dashboard's pages below ``base`` (where the router is mounted)."""

    base: str = "/dashboard"
    docs: str | None = "/docs"

    def runs(self, **query: object) -> str:
        return with_query(f"{self.base}/", **query)

    def run(self, run_id: object, **query: object) -> str:
        return with_query(f"{self.base}/runs/{esc(str(run_id))}", **query)

    def report(self, run_id: object) -> str:
        return f"{self.run(run_id)}/report.html"

    def trial(self, trial_id: object) -> str:
        return f"{self.base}/trials/{esc(str(trial_id))}"

    def leaderboard(self, **query: object) -> str:
        return with_query(f"{self.base}/leaderboard", **query)

    def static(self, name: str) -> str:
        return with_query(f"{self.base}/static/{name}", v=asset_version(name))


# ---------------------------------------------------------------- page model and layout

@dataclass
class Page:
    """A rendered page body; ``live`` pages refresh their ``<main>`` every few seconds."""

    title: str
    body: str
    nav: str = ""
    live: bool = False
    status_code: int = 200


def render_main(page: Page) -> str:
    """The page's ``<main>`` element (also the response to ``?partial=1``)."""
    live = f' data-live="{REFRESH_SECONDS}"' if page.live else ""
    return f'<main id="content"{live}>\n{page.body}\n</main>'


def render(page: Page, urls: Urls) -> str:
    """A full HTML document linking the dashboard's own static assets."""
    def nav_link(key: str, href: str, label: str) -> str:
        current = ' aria-current="page"' if page.nav == key else ""
        return f'<a href="{href}"{current}>{label}</a>'

    nav = "".join((nav_link("runs", urls.runs(), "Runs"),
                   nav_link("leaderboard", urls.leaderboard(), "Leaderboard"),
                   f'<a href="{esc(urls.docs)}">API docs</a>' if urls.docs else ""))
    head = (f'<link rel="stylesheet" href="{urls.static("dashboard.css")}">\n'
            f'<script src="{urls.static("plotly.min.js")}"></script>\n'
            f'<script src="{urls.static("dashboard.js")}" defer></script>')
    header = (f'<header class="topbar"><a class="brand" href="{urls.runs()}">bitbench</a>'
              f'<nav>{nav}</nav></header>')
    return _document(page, head, header)


def render_standalone(page: Page) -> str:
    """One self-contained HTML file: CSS, plotly.js and the figure script inlined."""
    def inline(name: str, tag: str) -> str:
        content = static_asset(name)[0].decode("utf-8").replace(f"</{tag}", f"<\\/{tag}")
        return f"<{tag}>\n{content}\n</{tag}>"

    head = "\n".join((inline("dashboard.css", "style"), inline("plotly.min.js", "script"),
                      inline("dashboard.js", "script")))
    header = '<header class="topbar"><span class="brand">bitbench</span><nav><span>run report</span></nav></header>'
    return _document(page, head, header)


def _document(page: Page, head: str, header: str) -> str:
    return (f'<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f'<link rel="icon" href="data:,">\n'
            f'<title>{esc(page.title)} · bitbench</title>\n{head}\n</head>\n'
            f'<body>\n{header}\n{render_main(page)}\n</body>\n</html>\n')


# ---------------------------------------------------------------- small pieces

def pct(value: float | None, digits: int = 1) -> str:
    """A fraction as a percentage, or an em dash."""
    return "—" if value is None else f"{100 * value:.{digits}f}%"


def when(value: object) -> str:
    """A timestamp (datetime or ISO string) as ``YYYY-MM-DD HH:MM:SS``, escaped."""
    if value in (None, ""):
        return "—"
    if isinstance(value, datetime):
        value = value.isoformat(sep=" ", timespec="seconds")
    stamp = str(value).replace("T", " ")[:19]
    return f'<time datetime="{esc(str(value))}">{esc(stamp)}</time>'


def status_badge(status: object) -> str:
    """A coloured status label."""
    cls = status if status in KNOWN_STATUSES else "unknown"
    return f'<span class="badge status-{cls}">{esc(str(status))}</span>'


def progress_bar(run: dict) -> str:
    """Stacked bar of a run's trials: done, failed, cancelled, running (rest queued)."""
    progress = run.get("progress") or {}
    total = run.get("trial_count") or sum(progress.values()) or 0
    parts = [(k, int(progress.get(k) or 0)) for k in ("done", "failed", "cancelled", "running")]
    segments = "".join(
        f'<span class="seg seg-{k}" style="width:{100 * n / total:.2f}%"></span>'
        for k, n in parts if n and total)
    finished = sum(n for k, n in parts if k != "running")
    title = ", ".join(f"{n} {k}" for k, n in (*parts, ("queued", int(progress.get("queued") or 0))))
    return (f'<div class="progress-wrap" data-done="{finished}" data-total="{total}">'
            f'<div class="progress" title="{esc(title)}">{segments}</div>'
            f'<span class="progress-text">{finished}/{total}</span></div>')


def figure_block(fig: go.Figure, element_id: str, **data: str) -> str:
    """A plot placeholder and its JSON spec; ``dashboard.js`` draws it with Plotly.react."""
    spec = fig.to_json().replace("</", "<\\/")
    attrs = "".join(f' data-{k}="{esc(str(v))}"' for k, v in data.items())
    return (f'<div class="plot" id="{esc(element_id)}" data-spec="{esc(element_id)}-spec"{attrs}></div>\n'
            f'<script type="application/json" id="{esc(element_id)}-spec">{spec}</script>')


def table(headers: list[str], rows: list[str], *, element_id: str, empty: str) -> str:
    """A ``<table>`` from pre-rendered ``<tr>`` rows; header cells are trusted markup.

    Headers starting with ``#`` are right-aligned (numeric columns); the ``#`` is dropped.
    """
    if not rows:
        return f'<p class="empty" id="{element_id}-empty">{esc(empty)}</p>'
    head = "".join(f'<th class="num">{h[1:]}</th>' if h.startswith("#") else f"<th>{h}</th>" for h in headers)
    return (f'<div class="table-wrap"><table class="data" id="{element_id}">'
            f'<thead><tr>{head}</tr></thead><tbody>\n' + "\n".join(rows) + "\n</tbody></table></div>")


def section(title: str, body: str, *, extra: str = "") -> str:
    """A titled card."""
    return f'<section class="card"><div class="card-head"><h2>{title}</h2>{extra}</div>{body}</section>'


def not_found(what: str) -> Page:
    """A 404 page."""
    return Page("Not found", f'<section class="card"><h1>Not found</h1><p>{esc(what)}</p></section>',
                status_code=404)


def _num(value: object) -> str:
    return "—" if value is None else esc(str(value))


def kib(value: float | None) -> str:
    """Bytes as KiB with one decimal, or an em dash."""
    return "—" if value is None else f"{value / 1024:.1f} KiB"


# ---------------------------------------------------------------- runs list

def runs_page(runs: list[dict], total: int, urls: Urls, *, status: str | None = None,
              offset: int = 0, limit: int = RUNS_PER_PAGE) -> Page:
    """All runs, newest first as the source returns them, with a status filter and paging."""
    rows = [
        f'<tr data-run-id="{esc(str(r["id"]))}" data-status="{esc(str(r.get("status")))}">'
        f'<td class="num">{esc(str(r["id"]))}</td>'
        f'<td><a href="{urls.run(r["id"])}">{esc(str(r.get("name") or "(unnamed)"))}</a></td>'
        f'<td>{status_badge(r.get("status"))}</td><td>{_num(r.get("dataset"))}</td>'
        f'<td>{_num(r.get("model"))}</td><td>{progress_bar(r)}</td><td>{when(r.get("created_at"))}</td></tr>'
        for r in runs
    ]
    chips = "".join(
        f'<a class="chip{" active" if s == status else ""}" href="{urls.runs(status=s)}">{s or "all"}</a>'
        for s in (None, *KNOWN_STATUSES))
    pager = _pager(urls, status, offset, limit, total)
    body = section(f"Runs <span class=\"muted\">({total})</span>",
                   table(["#ID", "Name", "Status", "Dataset", "Model", "Trials", "Created"], rows,
                         element_id="runs", empty="No runs yet. Submit an experiment spec through the API (see API docs).")
                   + pager,
                   extra=f'<div class="chips">{chips}</div>')
    live = any(r.get("status") in ACTIVE_STATUSES for r in runs)
    return Page("Runs", body, nav="runs", live=live)


def _pager(urls: Urls, status: str | None, offset: int, limit: int, total: int) -> str:
    if total <= limit:
        return ""
    prev_link = (f'<a href="{urls.runs(status=status, offset=max(0, offset - limit) or None)}">← newer</a>'
                 if offset > 0 else "<span></span>")
    next_link = (f'<a href="{urls.runs(status=status, offset=offset + limit)}">older →</a>'
                 if offset + limit < total else "<span></span>")
    shown = f"{offset + 1}–{min(offset + limit, total)} of {total}"
    return f'<div class="pager">{prev_link}<span class="muted">{shown}</span>{next_link}</div>'


# ---------------------------------------------------------------- one run

def run_header(run: dict, urls: Urls | None) -> str:
    """Name, status, dataset/model, times, progress and (on the live page) the report link."""
    facts = [("Dataset", _num(run.get("dataset"))), ("Model", _num(run.get("model"))),
             ("Trials", _num(run.get("trial_count"))), ("Created", when(run.get("created_at"))),
             ("Started", when(run.get("started_at"))), ("Finished", when(run.get("finished_at"))),
             ("Spec hash", f'<code>{esc(str(run.get("spec_hash") or "—")[:12])}</code>')]
    facts_html = "".join(f"<div><dt>{k}</dt><dd>{v}</dd></div>" for k, v in facts)
    actions = (f'<a class="button" id="report-link" href="{urls.report(run["id"])}" download>'
               f'Download report (HTML)</a>') if urls else ""
    error = f'<pre class="error">{esc(str(run["error"]))}</pre>' if run.get("error") else ""
    return (f'<section class="card run-head"><div class="card-head">'
            f'<h1 id="run-name">{esc(str(run.get("name") or "(unnamed)"))}</h1>'
            f'{status_badge(run.get("status"))}<span class="muted">run #{esc(str(run["id"]))}</span>'
            f'<span class="spacer"></span>{actions}</div>'
            f'{progress_bar(run)}<dl class="facts">{facts_html}</dl>{error}</section>')


def metric_links(href, metric: str) -> str:
    """Links that switch a page between the final and the validation-selected accuracy;
    ``href(metric)`` gives each link's address."""
    links = "".join(
        f'<a class="metric-link{" active" if m == metric else ""}" data-metric="{m}" href="{href(m)}">'
        f'{esc(figures.metric_title(m))}</a>' for m in figures.METRICS)
    return f'<span class="metric-links" id="metric-links">{links}</span>'


def run_figures(run: dict, results: list[dict], metric: str = figures.DEFAULT_METRIC,
                urls: Urls | None = None) -> str:
    """Accuracy-vs-bits figure and one heat map per estimator of ``metric``, or a placeholder;
    with ``urls``, links to switch the metric."""
    if not figures.finished(results, metric):
        return section("Accuracy vs bits", '<p class="empty" id="acc-vs-bits-empty">No finished trials yet.</p>')
    paper = paper_points(run.get("dataset"), run.get("model"))
    note = (f'<span class="muted">open markers: paper, {esc(paper[0]["source"])}</span>' if paper else "")
    switch = metric_links(lambda m: urls.run(run["id"], metric=m), metric) if urls else ""
    main = section("Accuracy vs bits", figure_block(figures.accuracy_vs_bits(results, paper, metric=metric),
                                                    "acc-vs-bits", metric=metric), extra=switch + note)
    labels = sorted({figures.estimator_label(t) for t in figures.finished(results, metric)
                     if not figures.is_float_trial(t)})
    shared = figures.color_range(v for label in labels for row in figures.heatmap_matrix(results, label, metric)[2]
                                 for v in row)
    maps = "".join(
        f'<div class="heatmap">'
        f'{figure_block(figures.bits_heatmap(results, label, zrange=shared, metric=metric), f"heatmap-{i}", estimator=label)}'
        f'</div>'
        for i, label in enumerate(labels))
    grid = section("Mean accuracy by weight × activation bits", f'<div class="grid">{maps}</div>') if maps else ""
    return main + grid


def trials_table(trials: list[dict], urls: Urls | None) -> str:
    """The run's trials; keys link to trial pages when ``urls`` is given."""
    def key_cell(t: dict) -> str:
        key = esc(str(t.get("key") or t["id"]))
        return f'<a href="{urls.trial(t["id"])}">{key}</a>' if urls else key

    rows = [
        f'<tr data-trial-id="{esc(str(t["id"]))}" data-estimator="{esc(figures.estimator_label(t))}" '
        f'data-bits="{figures.config_label(figures.bit_config(t.get("w_bits"), t.get("a_bits")))}">'
        f'<td>{key_cell(t)}</td><td>{esc(figures.estimator_label(t))}</td>'
        f'<td class="num">{_num(t.get("w_bits"))}</td><td class="num">{_num(t.get("a_bits"))}</td>'
        f'<td class="num">{_num(t.get("seed"))}</td><td>{status_badge(t.get("status"))}</td>'
        f'<td class="num">{_num(t.get("epochs_done"))}</td><td class="num">{pct(t.get("final_test_acc"))}</td>'
        f'<td class="num">{pct(t.get("selected_test_acc"))}</td>'
        f'<td class="num">{pct(t.get("best_val_acc"))}</td><td class="num">{kib(t.get("packed_bytes"))}</td>'
        f'<td class="num">{pct(t.get("packed_agreement"), 2)}</td><td>{_num(t.get("device"))}</td>'
        f'<td class="num">{_num(t.get("attempts"))}</td></tr>'
        for t in trials
    ]
    return table(["Trial", "Estimator", "#W bits", "#A bits", "#Seed", "Status", "#Epochs", "#Test acc",
                  "#Selected test", "#Best val", "#Packed", "#Packed agrees", "Device", "#Attempts"], rows, element_id="trials",
                 empty="No trials.")


def spec_block(run: dict) -> str:
    """The run's experiment spec as pretty JSON, collapsed."""
    spec = json.dumps(run.get("spec"), indent=2, sort_keys=True, default=str)
    return f'<details class="card"><summary>Experiment spec</summary><pre>{esc(spec)}</pre></details>'


def run_page(run: dict, trials: list[dict], results: list[dict], urls: Urls,
             metric: str = figures.DEFAULT_METRIC) -> Page:
    """One run: figures and heat maps of ``metric``, trials; live while the run is queued or running."""
    body = (run_header(run, urls) + run_figures(run, results, metric, urls)
            + section(f'Trials <span class="muted">({len(trials)})</span>', trials_table(trials, urls))
            + spec_block(run))
    return Page(f"Run {run.get('name') or run['id']}", body, nav="runs",
                live=run.get("status") in ACTIVE_STATUSES)


def report_page(run: dict, trials: list[dict], results: list[dict]) -> Page:
    """The standalone report: the run page's content without links or live refresh."""
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = (run_header(run, None) + run_figures(run, results)
            + section("Trials", trials_table(trials, None)) + spec_block(run)
            + f'<p class="muted footer">Generated by bitbench on {stamp}.</p>')
    return Page(f"Report: {run.get('name') or run['id']}", body)


# ---------------------------------------------------------------- leaderboard

def choose_dataset_model(pairs: list[tuple[str, str]], dataset: str | None,
                         model: str | None) -> tuple[str | None, str | None]:
    """The requested (dataset, model) if available, else the first model of the dataset, else the first pair."""
    if (dataset, model) in pairs:
        return dataset, model
    for d, m in pairs:
        if d == dataset:
            return d, m
    return pairs[0] if pairs else (None, None)


def leaderboard_page(rows: list[dict], pairs: list[tuple[str, str]], dataset: str | None,
                     model: str | None, urls: Urls, metric: str = figures.DEFAULT_METRIC) -> Page:
    """Estimators ranked by ``metric`` per bit configuration, in the order the source returns them."""
    def options(values: list[str], selected: str | None) -> str:
        return "".join(f'<option value="{esc(v)}"{" selected" if v == selected else ""}>{esc(v)}</option>'
                       for v in values)

    datasets = list(dict.fromkeys(d for d, _ in pairs))
    models = [m for d, m in pairs if d == dataset]
    form = (f'<form class="selectors" method="get" action="{urls.leaderboard()}">'
            f'<label>Dataset <select name="dataset" id="dataset-select" data-autosubmit>{options(datasets, dataset)}</select></label>'
            f'<label>Model <select name="model" id="model-select" data-autosubmit>{options(models, model)}</select></label>'
            f'<label>Rank by <select name="metric" id="metric-select" data-autosubmit>'
            + "".join(f'<option value="{m}"{" selected" if m == metric else ""}>{esc(figures.metric_title(m))}</option>'
                      for m in figures.METRICS)
            + '</select></label>'
            f'<noscript><button type="submit">Show</button></noscript></form>')
    body_rows, previous = [], None
    for r in rows:
        bits = figures.config_label(figures.bit_config(r.get("w_bits"), r.get("a_bits")))
        if bits != previous:
            body_rows.append(f'<tr class="group" data-group="{bits}"><th colspan="8">{bits}</th></tr>')
            previous = bits
        best = bool(r.get("best"))
        mark = ' <span class="best-mark" title="best in this configuration">★ best</span>' if best else ""
        ci = f'{pct(r.get("ci_low"))} – {pct(r.get("ci_high"))}' if r.get("ci_low") is not None else "—"
        body_rows.append(
            f'<tr class="entry{" best" if best else ""}" data-rank="{esc(str(r.get("rank")))}" '
            f'data-estimator="{esc(str(r.get("estimator_label")))}" data-bits="{bits}" '
            f'data-best="{str(best).lower()}"><td class="num">{esc(str(r.get("rank")))}</td>'
            f'<td>{esc(str(r.get("estimator_label")))}{mark}</td><td class="num">{pct(r.get("mean"), 2)}</td>'
            f'<td class="num">{pct(r.get("std"), 2)}</td><td class="num">{ci}</td>'
            f'<td class="num">{_num(r.get("n"))}</td><td class="num">{kib(r.get("packed_bytes"))}</td>'
            f'<td class="num">{pct(r.get("packed_agreement"), 2)}</td></tr>')
    empty = ("No finished trials for this dataset and model yet." if pairs
             else "No finished trials yet.")
    title = f'Leaderboard <span class="muted">{esc(dataset or "")} / {esc(model or "")}</span>' if dataset else "Leaderboard"
    body = section(title, table(["#Rank", "Estimator", "#Mean test acc", "#Std", "#95% CI", "#Seeds", "#Packed size",
                                 "#Packed agrees (min)"], body_rows,
                                element_id="leaderboard", empty=empty)
                   + f'<p class="muted" id="leaderboard-metric" data-metric="{metric}">Mean '
                     f'{esc(figures.metric_title(metric))} over seeds; rank 1 is the best estimator '
                     'within its bit configuration. Packed: size of the bit-packed XNOR/SHIFT export and the '
                     'lowest agreement of its predictions with the trained model\'s.</p>', extra=form)
    return Page("Leaderboard", body, nav="leaderboard")


# ---------------------------------------------------------------- one trial

def trial_page(trial: dict, run: dict | None, urls: Urls) -> Page:
    """One trial: facts, training curves and the per-epoch metrics."""
    metrics = sorted(trial.get("metrics") or [], key=lambda m: m["epoch"])
    run_link = (f'<a href="{urls.run(run["id"])}">{esc(str(run.get("name") or run["id"]))}</a> › '
                if run else "")
    params = json.dumps(trial.get("estimator_params") or {}, sort_keys=True, default=str)
    facts = [("Estimator", esc(figures.estimator_label(trial))), ("Parameters", f"<code>{esc(params)}</code>"),
             ("Bits", figures.config_label(figures.bit_config(trial.get("w_bits"), trial.get("a_bits")))),
             ("Seed", _num(trial.get("seed"))), ("Epochs", _num(trial.get("epochs_done"))),
             ("Device", _num(trial.get("device"))), ("Attempts", _num(trial.get("attempts"))),
             ("Final test acc", pct(trial.get("final_test_acc"), 2)),
             ("Final val acc", pct(trial.get("final_val_acc"), 2)), ("Best val acc", pct(trial.get("best_val_acc"), 2)),
             ("Selected test acc", pct(trial.get("selected_test_acc"), 2)
              + (f' <span class="muted">(epoch {_num(trial["selected_epoch"])})</span>'
                 if trial.get("selected_epoch") is not None else "")),
             ("Packed export", kib(trial.get("packed_bytes"))),
             ("Packed engine agrees", pct(trial.get("packed_agreement"), 2)),
             ("Started", when(trial.get("started_at"))), ("Finished", when(trial.get("finished_at")))]
    facts_html = "".join(f"<div><dt>{k}</dt><dd>{v}</dd></div>" for k, v in facts)
    error = f'<pre class="error">{esc(str(trial["error"]))}</pre>' if trial.get("error") else ""
    head = (f'<section class="card"><div class="crumbs">{run_link}trial</div><div class="card-head">'
            f'<h1 id="trial-key">{esc(str(trial.get("key") or trial["id"]))}</h1>{status_badge(trial.get("status"))}'
            f'</div><dl class="facts">{facts_html}</dl>{error}</section>')
    curves = (figure_block(figures.training_curves(trial), "training-curves") if metrics
              else '<p class="empty" id="training-curves-empty">No epochs recorded yet.</p>')
    schedule_keys = sorted({k for m in metrics for k in (m.get("schedule") or {})})
    rows = [
        f'<tr data-epoch="{esc(str(m["epoch"]))}"><td class="num">{esc(str(m["epoch"]))}</td>'
        f'<td class="num">{_fmt(m.get("train_loss"))}</td><td class="num">{pct(m.get("train_acc"), 2)}</td>'
        f'<td class="num">{pct(m.get("val_acc"), 2)}</td><td class="num">{pct(m.get("test_acc"), 2)}</td>'
        f'<td class="num">{_fmt(m.get("lr"))}</td><td class="num">{pct(m.get("weight_flips"), 2)}</td>'
        + "".join(f'<td class="num">{_fmt((m.get("schedule") or {}).get(k))}</td>' for k in schedule_keys)
        + f'<td class="num">{_fmt(m.get("epoch_seconds"), 3)}</td></tr>'
        for m in metrics
    ]
    metric_table = table(["#Epoch", "#Train loss", "#Train acc", "#Val acc", "#Test acc", "#LR", "#Weight flips",
                          *("#" + esc(k) for k in schedule_keys), "#Seconds"], rows,
                         element_id="metrics", empty="No epochs recorded yet.")
    body = head + section("Training curves", curves) + section("Per-epoch metrics", metric_table)
    return Page(f"Trial {trial.get('key') or trial['id']}", body, nav="runs",
                live=trial.get("status") in ACTIVE_STATUSES)


def _fmt(value: object, digits: int = 4) -> str:
    return f"{value:.{digits}g}" if isinstance(value, (int, float)) else _num(value)
