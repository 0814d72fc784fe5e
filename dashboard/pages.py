"""Server-rendered HTML pages built from plain records (no web framework needed here).

Each page function gathers its template's context; the markup is in ``dashboard/templates``,
rendered by Jinja2 with autoescaping on, so every piece of record text is escaped where it is
written. Figures are embedded as plotly's JSON (``<script type="application/json">``, the only
``|safe`` besides the inlined static files) and drawn by ``static/dashboard.js`` with the
plotly.js bundle that the router serves from the installed plotly package.
"""

from __future__ import annotations

import hashlib
import html
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from importlib import resources
from itertools import groupby
from urllib.parse import quote, urlencode

import plotly
import plotly.graph_objects as go
from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup
from plotly.offline import get_plotlyjs

from workers.records import ACTIVE, STATUSES

from . import compare, figures
from .paper_results import paper_points

ACTIVE_STATUSES = ACTIVE  # a page showing one of these refreshes itself
KNOWN_STATUSES = STATUSES
REFRESH_SECONDS = 5
RUNS_PER_PAGE = 50
TRIALS_PER_PAGE = 100
STATIC_TYPES = {"dashboard.css": "text/css; charset=utf-8",
                "dashboard.js": "text/javascript; charset=utf-8"}


# ---------------------------------------------------------------- static assets

@cache
def static_asset(name: str) -> tuple[bytes, str]:
    """(content, media type) of a file in ``dashboard/static`` or of the plotly.js bundle."""
    if name == "plotly.min.js":
        return get_plotlyjs().encode("utf-8"), "text/javascript; charset=utf-8"
    if name not in STATIC_TYPES:
        raise KeyError(name)
    return resources.files("dashboard").joinpath("static", name).read_bytes(), STATIC_TYPES[name]


@cache
def asset_version(name: str) -> str:
    """Cache-busting token for a static asset (the plotly version for the bundle)."""
    if name == "plotly.min.js":
        return plotly.__version__
    return hashlib.sha256(static_asset(name)[0]).hexdigest()[:12]


def inline_asset(name: str, tag: str) -> str:
    """A static asset's text for a ``<style>``/``<script>`` element (``</tag`` written as ``<\\/tag``)."""
    return static_asset(name)[0].decode("utf-8").replace(f"</{tag}", f"<\\/{tag}")


# ---------------------------------------------------------------- urls

def with_query(path: str, **params: object) -> str:
    """``path`` plus the non-empty ``params`` as a query string (a list value repeats its key)."""
    query = urlencode({k: v for k, v in params.items() if v not in (None, "", [], ())}, doseq=True)
    return f"{path}?{query}" if query else path


@dataclass(frozen=True)
class Urls:
    """Paths of the dashboard's pages below ``base`` (where the router is mounted); plain URLs,
    escaped by the templates that write them."""

    base: str = "/dashboard"
    docs: str | None = "/docs"

    def runs(self, **query: object) -> str:
        return with_query(f"{self.base}/", **query)

    def run(self, run_id: object, **query: object) -> str:
        return with_query(f"{self.base}/runs/{quote(str(run_id), safe='')}", **query)

    def report(self, run_id: object) -> str:
        return f"{self.run(run_id)}/report.html"

    def trial(self, trial_id: object) -> str:
        return f"{self.base}/trials/{quote(str(trial_id), safe='')}"

    def leaderboard(self, **query: object) -> str:
        return with_query(f"{self.base}/leaderboard", **query)

    def compare(self, run_ids: list[int] | tuple[int, ...] = (), **query: object) -> str:
        return with_query(f"{self.base}/compare", run=list(run_ids), **query)

    def static(self, name: str) -> str:
        return with_query(f"{self.base}/static/{name}", v=asset_version(name))


# ---------------------------------------------------------------- text formats (template filters)

def pct(value: float | None, digits: int = 1) -> str:
    """A fraction as a percentage, or an em dash."""
    return "—" if value is None else f"{100 * value:.{digits}f}%"


def kib(value: float | None) -> str:
    """Bytes as KiB with one decimal, or an em dash."""
    return "—" if value is None else f"{value / 1024:.1f} KiB"


def num(value: object) -> str:
    """A value as text, or an em dash for None."""
    return "—" if value is None else str(value)


def fmt(value: object, digits: int = 4) -> str:
    """A number with ``digits`` significant digits; anything else as :func:`num`."""
    return f"{value:.{digits}g}" if isinstance(value, (int, float)) else num(value)


def timestamp(value: object) -> tuple[str, str] | None:
    """(machine-readable, ``YYYY-MM-DD HH:MM:SS``) of a datetime or ISO string; None for none."""
    if value in (None, ""):
        return None
    if isinstance(value, datetime):
        value = value.isoformat(sep=" ", timespec="seconds")
    return str(value), str(value).replace("T", " ")[:19]


def status_class(status: object) -> str:
    """The CSS class suffix of a status badge: the status if known, else ``unknown``."""
    return status if status in KNOWN_STATUSES else "unknown"  # type: ignore[return-value]


def numeric(header: str) -> str:
    """A ``data_table`` header for a right-aligned (numeric) column."""
    return f"#{header}"


def bits_label(record: dict) -> str:
    """A record's bit configuration label (``W1A2``, ``float``)."""
    return figures.config_label(figures.bit_config(record.get("w_bits"), record.get("a_bits")))


# ---------------------------------------------------------------- templates

def escape(value: object) -> Markup:
    """What autoescaping writes for a ``{{ value }}``: markup as it is, anything else escaped as
    ``html.escape`` does (``&quot;`` and ``&#x27;``: the entities the dashboard has always written)."""
    return Markup(value) if hasattr(value, "__html__") else Markup(html.escape(str(value)))


# ``finalize`` runs on every {{ }} before autoescaping, which then leaves its Markup as it is
_templates = Environment(loader=PackageLoader("dashboard"), autoescape=True, finalize=escape, trim_blocks=True,
                         lstrip_blocks=True, undefined=StrictUndefined)
_templates.filters.update(pct=pct, kib=kib, num=num, fmt=fmt, numeric=numeric, estimator_label=figures.estimator_label,
                          metric_title=figures.metric_title, bits_label=bits_label, status_class=status_class)
_templates.globals.update(timestamp=timestamp)


def render_template(name: str, **context: object) -> Markup:
    """``dashboard/templates/<name>`` rendered with ``context`` (autoescaped)."""
    return Markup(_templates.get_template(name).render(**context))


# ---------------------------------------------------------------- page model and layout

@dataclass
class Page:
    """A rendered page body; ``live`` pages refresh their ``<main>`` every few seconds."""

    title: str
    body: Markup
    nav: str = ""
    live: bool = False
    status_code: int = 200


def render_main(page: Page) -> str:
    """The page's ``<main>`` element (also the response to ``?partial=1``)."""
    return render_template("main.html", page=page, refresh=REFRESH_SECONDS)


def render(page: Page, urls: Urls) -> str:
    """A full HTML document linking the dashboard's own static assets."""
    return render_template("document.html", page=page, main=render_main(page), urls=urls)


def render_standalone(page: Page) -> str:
    """One self-contained HTML file: CSS, plotly.js and the figure script inlined."""
    inline = {"css": inline_asset("dashboard.css", "style"), "plotly": inline_asset("plotly.min.js", "script"),
              "js": inline_asset("dashboard.js", "script")}
    return render_template("document.html", page=page, main=render_main(page), urls=None, inline=inline)


def not_found(what: str) -> Page:
    """A 404 page."""
    return problem_page("Not found", what, 404)


def problem_page(title: str, what: str, status_code: int) -> Page:
    """A page that only says what is wrong with the request (4xx)."""
    return Page(title, render_template("not_found.html", title=title, what=what), status_code=status_code)


# ---------------------------------------------------------------- pieces of context

def progress(run: dict) -> dict:
    """A run's trials for its stacked bar: done, failed, cancelled, running (the rest queued)."""
    counts = run.get("progress") or {}
    total = run.get("trial_count") or sum(counts.values()) or 0
    parts = [(k, int(counts.get(k) or 0)) for k in ("done", "failed", "cancelled", "running")]
    return {"total": total, "finished": sum(n for k, n in parts if k != "running"),
            "segments": [(k, f"{100 * n / total:.2f}") for k, n in parts if n and total],
            "title": ", ".join(f"{n} {k}" for k, n in (*parts, ("queued", int(counts.get("queued") or 0))))}


def figure(fig: go.Figure, element_id: str, **data: object) -> dict:
    """A plot placeholder's context: ``dashboard.js`` draws ``spec`` (plotly's JSON, ``</`` written as
    ``<\\/``) into the element ``element_id`` with Plotly.react; ``data`` become ``data-*`` attributes."""
    return {"id": element_id, "spec": fig.to_json().replace("</", "<\\/"), "data": list(data.items())}


def run_figures(run: dict, results: list[dict], metric: str) -> dict | None:
    """Accuracy-vs-bits figure and one heat map per estimator of ``metric`` (one colour scale);
    None before any trial has finished."""
    if not figures.finished(results, metric):
        return None
    paper = paper_points(run.get("dataset"), run.get("model"))
    labels = sorted({figures.estimator_label(t) for t in figures.finished(results, metric)
                     if not figures.is_float_trial(t)})
    shared = figures.color_range(v for label in labels for row in figures.heatmap_matrix(results, label, metric)[2]
                                 for v in row)
    return {"paper_source": paper[0]["source"] if paper else None,
            "main": figure(figures.accuracy_vs_bits(results, paper, metric=metric), "acc-vs-bits", metric=metric),
            "heatmaps": [figure(figures.bits_heatmap(results, label, zrange=shared, metric=metric), f"heatmap-{i}",
                                estimator=label) for i, label in enumerate(labels)]}


def pager(link: Callable[[int | None], str], offset: int, limit: int, total: int) -> dict | None:
    """Links to the previous and next pages of a list of ``total`` rows shown ``limit`` at a time
    (``link(offset)`` is a page's URL, offset None for the first), and which rows this page shows;
    None when they fit on one page."""
    if total <= limit:
        return None
    return {"newer": link(max(0, offset - limit) or None) if offset > 0 else None,
            "older": link(offset + limit) if offset + limit < total else None,
            "shown": f"{offset + 1}–{min(offset + limit, total)} of {total}" if offset < total else f"— of {total}"}


# ---------------------------------------------------------------- pages

def runs_page(runs: list[dict], total: int, urls: Urls, *, status: str | None = None,
              offset: int = 0, limit: int = RUNS_PER_PAGE, selected: list[int] | tuple[int, ...] = ()) -> Page:
    """All runs, newest first as the source returns them, with a status filter and paging; a GET
    form sends the checked runs to the compare page (``selected`` come checked, and stay selected
    across pages as hidden inputs where they are not on this one)."""
    selected = list(dict.fromkeys(selected))
    shown = {r["id"] for r in runs}
    body = render_template("runs.html", runs=runs, total=total, urls=urls, status=status,
                           statuses=(None, *KNOWN_STATUSES), progress=progress, selected=selected,
                           hidden=[i for i in selected if i not in shown], max_compare=compare.MAX_RUNS,
                           pager=pager(lambda o: urls.runs(status=status, offset=o, run=selected), offset, limit,
                                       total))
    return Page("Runs", body, nav="runs", live=any(r.get("status") in ACTIVE_STATUSES for r in runs))


def _run_context(run: dict, trials: list[dict], results: list[dict], metric: str) -> dict:
    return {"run": run, "trials": trials, "figures": run_figures(run, results, metric), "metric": metric,
            "metrics": figures.METRICS, "progress": progress, "trial_total": len(trials), "pager": None,
            "spec": json.dumps(run.get("spec"), indent=2, sort_keys=True, default=str)}


def trial_total(run: dict) -> int:
    """How many trials a run has (its grid's size; else its trials counted by status)."""
    return int(run.get("trial_count") or sum((run.get("progress") or {}).values()) or 0)


def run_page(run: dict, trials: list[dict], results: list[dict], urls: Urls,
             metric: str = figures.DEFAULT_METRIC, *, offset: int = 0, limit: int = TRIALS_PER_PAGE) -> Page:
    """One run: figures and heat maps of ``metric`` over all its finished trials (``results``), and
    one page of its trials (``trials``: ``limit`` from ``offset``, with a pager); live while the run
    is queued or running."""
    total = trial_total(run)

    def link(page_offset: int | None) -> str:
        shown_metric = None if metric == figures.DEFAULT_METRIC else metric
        return urls.run(run["id"], metric=shown_metric, offset=page_offset) + "#trials"

    context = {**_run_context(run, trials, results, metric), "trial_total": total,
               "pager": pager(link, offset, limit, total)}
    body = render_template("run.html", **context, urls=urls, generated=None)
    return Page(f"Run {run.get('name') or run['id']}", body, nav="runs",
                live=run.get("status") in ACTIVE_STATUSES)


def report_page(run: dict, trials: list[dict], results: list[dict]) -> Page:
    """The standalone report: the run page's content without links or live refresh."""
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    body = render_template("run.html", **_run_context(run, trials, results, figures.DEFAULT_METRIC), urls=None,
                           generated=stamp)
    return Page(f"Report: {run.get('name') or run['id']}", body)


def choose_dataset_model(pairs: list[tuple[str, str]], dataset: str | None,
                         model: str | None) -> tuple[str | None, str | None]:
    """The requested (dataset, model) if available, else the first model of the dataset, else the first pair."""
    if (dataset, model) in pairs:
        return dataset, model
    for d, m in pairs:
        if d == dataset:
            return d, m
    return pairs[0] if pairs else (None, None)


def choose_protocol(protocols: list[tuple[str, str]], protocol: str | None) -> str | None:
    """The requested protocol if the dataset and model have it, else the first (by label), else None."""
    ids = [p for p, _ in protocols]
    return protocol if protocol in ids else (ids[0] if ids else None)


def leaderboard_page(rows: list[dict], pairs: list[tuple[str, str]], dataset: str | None,
                     model: str | None, urls: Urls, metric: str = figures.DEFAULT_METRIC, *,
                     protocols: list[tuple[str, str]] | None = None, protocol: str | None = None) -> Page:
    """Estimators ranked by ``metric`` per bit configuration within one protocol (``protocols``: the
    dataset and model's ``(id, label)`` choices), in the order the source returns them."""
    body = render_template("leaderboard.html", urls=urls, dataset=dataset, model=model, metric=metric,
                           metrics=figures.METRICS, datasets=list(dict.fromkeys(d for d, _ in pairs)),
                           models=[m for d, m in pairs if d == dataset], have_pairs=bool(pairs),
                           protocols=protocols or [], protocol=protocol,
                           set_aside=sum(int(r.get("set_aside") or 0) for r in rows),
                           groups=[(bits, list(group)) for bits, group in groupby(rows, key=bits_label)])
    return Page("Leaderboard", body, nav="leaderboard")


def trial_page(trial: dict, run: dict | None, urls: Urls) -> Page:
    """One trial: facts, training curves and the per-epoch metrics."""
    metrics = sorted(trial.get("metrics") or [], key=lambda m: m["epoch"])
    body = render_template(
        "trial.html", trial=trial, run=run, urls=urls, metrics=metrics,
        params=json.dumps(trial.get("estimator_params") or {}, sort_keys=True, default=str),
        curves=figure(figures.training_curves(trial), "training-curves") if metrics else None,
        schedule_keys=sorted({k for m in metrics for k in (m.get("schedule") or {})}))
    return Page(f"Trial {trial.get('key') or trial['id']}", body, nav="runs",
                live=trial.get("status") in ACTIVE_STATUSES)


def compare_figure(run: dict, results: list[dict], metric: str, index: int, y_range: list[float] | None) -> dict | None:
    """One run's accuracy-vs-bits figure for the compare page (None before any trial finished)."""
    if not figures.finished(results, metric):
        return None
    fig = figures.accuracy_vs_bits(results, metric=metric)
    if y_range:
        fig.update_yaxes(range=y_range)
    return figure(fig, f"acc-vs-bits-{index}", run=run["id"], metric=metric)


def shared_range(results: list[list[dict]], metric: str) -> list[float] | None:
    """One y range for every run's figure: the lowest to the highest trial value, padded."""
    field = figures.METRICS[metric][0]
    values = [float(t[field]) for rs in results for t in figures.finished(rs, metric)]
    if not values:
        return None
    pad = 0.1 * (max(values) - min(values)) + 0.01
    return [max(0.0, min(values) - pad), min(1.0, max(values) + pad)]


def compare_page(runs: list[dict], results: list[list[dict]], boards: list[list[dict]], urls: Urls,
                 metric: str = figures.DEFAULT_METRIC) -> Page:
    """Runs side by side: each one's accuracy-vs-bits figure of ``metric`` (one y range), their
    leaderboards merged by bit configuration and estimator, and how their recipes differ.
    ``results[i]`` and ``boards[i]`` are ``runs[i]``'s finished trials and leaderboard rows."""
    y_range = shared_range(results, metric)
    panels = [{"run": run, "figure": compare_figure(run, rs, metric, i, y_range)}
              for i, (run, rs) in enumerate(zip(runs, results, strict=True))]
    rows = compare.side_by_side(boards)
    groups = [(bits, list(group)) for bits, group in groupby(rows, key=bits_label)]
    body = render_template(
        "compare.html", urls=urls, runs=runs, panels=panels, groups=groups, metric=metric, metrics=figures.METRICS,
        differences=compare.recipe_differences([r.get("spec") for r in runs]), recipe_value=compare.recipe_value,
        protocols=any(r.get("protocol_label") for r in runs), run_ids=[r["id"] for r in runs])
    return Page("Compare runs", body, nav="runs", live=any(r.get("status") in ACTIVE_STATUSES for r in runs))
