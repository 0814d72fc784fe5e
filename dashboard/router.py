"""FastAPI router for the dashboard; the service mounts ``create_router(source)`` at ``/dashboard``.

``source`` is any object with these methods, all returning plain dicts (docs/CONTRACTS.md)::

    list_runs(**filters) -> (list[Run], total)      # filters: status, limit, offset
    get_run(run_id) -> Run | None
    list_trials(run_id, limit=None, offset=0) -> list[Trial]   # grid order; one page with limit
    get_trial(trial_id) -> Trial + {"metrics": [Metric]} | None
    leaderboard(dataset, model, protocol, metric) -> list[LeaderboardRow]   # metric: "final" | "selected"
    protocols(dataset, model) -> list[(protocol, label)]   # the protocols with finished results
    run_leaderboard(run_id, metric) -> list[LeaderboardRow]      # one run's own (the compare page)
    run_results(run_id) -> list[Trial]              # finished trials with final metrics
    datasets_models() -> list[(dataset, model)]
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, Response

from . import compare, figures, pages

PAGE_HEADERS = {"Cache-Control": "no-store"}
STATIC_HEADERS = {"Cache-Control": "public, max-age=31536000, immutable"}


def create_router(source: Any) -> APIRouter:
    """HTML pages, the standalone run report and the dashboard's static files (plotly.js included)."""
    router = APIRouter(include_in_schema=False)

    def urls(request: Request) -> pages.Urls:
        docs = getattr(request.app, "docs_url", None)
        return pages.Urls(request.url_for("dashboard.runs").path.rstrip("/"),
                          docs and request.scope.get("root_path", "") + docs)

    def respond(request: Request, page: pages.Page) -> HTMLResponse:
        partial = request.query_params.get("partial") == "1"
        content = pages.render_main(page) if partial else pages.render(page, urls(request))
        return HTMLResponse(content, status_code=page.status_code, headers=PAGE_HEADERS)

    @router.get("", name="dashboard.home")
    @router.get("/", name="dashboard.runs")
    def runs(request: Request, status: str | None = None, offset: int = Query(0, ge=0),
             run: list[str] = Query([])) -> HTMLResponse:
        status = status if status in pages.KNOWN_STATUSES else None
        filters = {"status": status} if status else {}
        items, total = source.list_runs(**filters, limit=pages.RUNS_PER_PAGE, offset=offset)
        selected = [int(r) for r in run if r.isascii() and r.isdigit()][:compare.MAX_RUNS]  # pre-checked
        return respond(request, pages.runs_page(items, total, urls(request), status=status, offset=offset,
                                                limit=pages.RUNS_PER_PAGE, selected=selected))

    def known_metric(metric: str | None) -> str:
        return metric if metric in figures.METRICS else figures.DEFAULT_METRIC

    @router.get("/runs/{run_id}", name="dashboard.run")
    def run(request: Request, run_id: int, metric: str | None = None, offset: int = Query(0, ge=0)) -> HTMLResponse:
        record = source.get_run(run_id)
        if record is None:
            return respond(request, pages.not_found(f"There is no run {run_id}."))
        trials = source.list_trials(run_id, limit=pages.TRIALS_PER_PAGE, offset=offset)
        page = pages.run_page(record, trials, source.run_results(run_id), urls(request), known_metric(metric),
                              offset=offset, limit=pages.TRIALS_PER_PAGE)
        return respond(request, page)

    @router.get("/compare", name="dashboard.compare")
    def compare_runs(request: Request, run: list[str] = Query([]), metric: str | None = None) -> HTMLResponse:
        try:
            run_ids = compare.parse_selection(run)
        except compare.BadSelection as e:
            return respond(request, pages.problem_page("Cannot compare", str(e), 400))
        records = [source.get_run(i) for i in run_ids]
        missing = [i for i, r in zip(run_ids, records, strict=True) if r is None]
        if missing:
            return respond(request, pages.not_found(f"There is no run {', '.join(map(str, missing))}."))
        metric = known_metric(metric)
        page = pages.compare_page(records, [source.run_results(i) for i in run_ids],
                                  [source.run_leaderboard(i, metric=metric) for i in run_ids], urls(request), metric)
        return respond(request, page)

    @router.get("/runs/{run_id}/report.html", name="dashboard.report")
    def report(request: Request, run_id: int) -> HTMLResponse:
        record = source.get_run(run_id)
        if record is None:
            return respond(request, pages.not_found(f"There is no run {run_id}."))
        page = pages.report_page(record, source.list_trials(run_id), source.run_results(run_id))
        headers = {**PAGE_HEADERS,
                   "Content-Disposition": f'attachment; filename="bitbench-run-{run_id}.html"'}
        return HTMLResponse(pages.render_standalone(page), headers=headers)

    @router.get("/trials/{trial_id}", name="dashboard.trial")
    def trial(request: Request, trial_id: int) -> HTMLResponse:
        record = source.get_trial(trial_id)
        if record is None:
            return respond(request, pages.not_found(f"There is no trial {trial_id}."))
        run_record = source.get_run(record["run_id"]) if record.get("run_id") is not None else None
        return respond(request, pages.trial_page(record, run_record, urls(request)))

    @router.get("/leaderboard", name="dashboard.leaderboard")
    def leaderboard(request: Request, dataset: str | None = None, model: str | None = None,
                    protocol: str | None = None, metric: str | None = None) -> HTMLResponse:
        pairs = [tuple(p) for p in source.datasets_models()]
        dataset, model = pages.choose_dataset_model(pairs, dataset, model)
        metric = known_metric(metric)
        protocols = [tuple(p) for p in source.protocols(dataset=dataset, model=model)] if dataset is not None else []
        protocol = pages.choose_protocol(protocols, protocol)
        rows = (source.leaderboard(dataset=dataset, model=model, protocol=protocol, metric=metric)
                if protocol is not None else [])
        return respond(request, pages.leaderboard_page(rows, pairs, dataset, model, urls(request), metric,
                                                       protocols=protocols, protocol=protocol))

    @router.get("/static/{name}", name="dashboard.static")
    def static(name: str) -> Response:
        try:
            content, media_type = pages.static_asset(name)
        except (KeyError, FileNotFoundError):
            return Response("not found", status_code=404, media_type="text/plain")
        return Response(content, media_type=media_type, headers=STATIC_HEADERS)

    return router
