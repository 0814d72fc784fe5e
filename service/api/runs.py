"""/runs: queue an experiment spec, list and inspect runs, cancel, export."""
from __future__ import annotations

import csv
import io
import json
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Query, Request, Response, status
from fastapi.responses import JSONResponse
from pydantic import Field

from service import report, store
from service.tables import MAX_ID
from workers import plan
from workers.records import METRIC_KEYS, Run, Status

from .deps import (
    NO_PARAMETERS_BODY,
    WRITE_GUARDS,
    Offset,
    RowId,
    SessionDep,
    SpecBody,
    http_error,
    no_parameters,
    not_found,
)
from .schemas import DryRunOut, ErrorOut, RunCreated, RunDetail, RunOut, RunPage, RunStatus, TrialOut

router = APIRouter(prefix="/runs", tags=["runs"])
MAX_ALSO = 31  # a report over at most 32 runs
# the header of an export with no epochs yet (store.export_rows' columns, less schedule values)
_EXPORT_COLUMNS = ("run_id", "trial_key", "estimator", "estimator_label", "w_bits", "a_bits", "seed",
                   *(f for f in METRIC_KEYS if f != "schedule"))

_SPEC_EXAMPLE = {"name": "digits: aqe vs ste", "dataset": "digits", "model": "digits_net", "estimators": ["aqe", "ste"],
                 "bits": {"w": [1, 2], "a": 1}, "seeds": [0, 1], "epochs": 5}  # 10 trials, a minute on a CPU
_SPEC_BODY = {  # the body is parsed by deps.spec_body; this documents it in /docs
    "requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/ExperimentSpec"}, "example": _SPEC_EXAMPLE}}},
}
_WRITE_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorOut} for code in (401, 403, 413, 415, 422)}

def _run_or_404(session, run_id: int) -> Run:
    run = store.get_run(session, run_id)
    if run is None:
        raise not_found("run", run_id, "run_id")
    return run


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=RunCreated, openapi_extra=_SPEC_BODY,
             dependencies=WRITE_GUARDS, responses={200: {"model": RunCreated | DryRunOut}, **_WRITE_ERRORS})
def create_run(
    spec: SpecBody, session: SessionDep, request: Request, response: Response,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", max_length=200)] = None,
    dry_run: Annotated[bool, Query(description="validate and expand the spec, queue nothing: 200 with the trial "
                                               "count, the estimated GPU time and the data files it needs")] = False,
):
    """Queue a sweep: one trial per grid cell. 202 with ``Location``; a repeated
    ``Idempotency-Key`` with the same body returns the first run (200). With ``dry_run`` nothing is
    written: 200 with :class:`DryRunOut`."""
    if dry_run:
        return JSONResponse(DryRunOut(**plan.dry_run(spec)).model_dump(mode="json"))
    try:
        run, created = store.create_run(session, spec, idempotency_key=idempotency_key)
    except store.IdempotencyConflict as e:
        raise http_error(status.HTTP_422_UNPROCESSABLE_CONTENT, ("header", "Idempotency-Key"), str(e),
                         "idempotency_conflict") from None
    location = str(request.app.url_path_for("get_run", run_id=run["id"]))
    response.headers["Location"] = location
    if not created:
        response.status_code = status.HTTP_200_OK
    return RunCreated(id=run["id"], trial_count=run["trial_count"], status=run["status"], location=location)


@router.get("", response_model=RunPage)
def list_runs(
    session: SessionDep,
    status: RunStatus | None = None,
    dataset: str | None = None,
    model: str | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Offset = 0,
):
    """Runs, newest first, with the total count matching the filters."""
    items, total = store.list_runs(session, status=status, dataset=dataset, model=model, limit=limit, offset=offset)
    return RunPage(items=items, total=total, limit=limit, offset=offset)


@router.get("/{run_id}", response_model=RunDetail, responses={404: {"model": ErrorOut}})
def get_run(run_id: RowId, session: SessionDep):
    """A run: status, progress by trial status, epochs stored so far, timestamps, error."""
    run = _run_or_404(session, run_id)
    trials = store.list_trials(session, run_id)
    done = sum(t["epochs_done"] or 0 for t in trials)
    current = {t["key"]: t["epochs_done"] or 0 for t in trials if t["status"] == Status.RUNNING}
    return {**run, "epochs": {"done": done, "total": len(trials) * run["spec"]["epochs"]}, "current_epochs": current}


@router.get("/{run_id}/trials", response_model=list[TrialOut], responses={404: {"model": ErrorOut}})
def list_run_trials(run_id: RowId, session: SessionDep):
    """The run's trials in grid order."""
    _run_or_404(session, run_id)
    return store.list_trials(session, run_id)


@router.post("/{run_id}/cancel", response_model=RunOut, status_code=status.HTTP_202_ACCEPTED,
             dependencies=[*WRITE_GUARDS, Depends(no_parameters)], openapi_extra=NO_PARAMETERS_BODY,
             responses={200: {"model": RunOut}, 404: {"model": ErrorOut}, **_WRITE_ERRORS})
def cancel_run(run_id: RowId, session: SessionDep, response: Response):
    """Cancel: a queued run stops at once (200); a running one is asked to stop (202)."""
    run = store.request_cancel(session, run_id)
    if run is None:
        raise not_found("run", run_id, "run_id")
    if run["status"] != Status.RUNNING:
        response.status_code = status.HTTP_200_OK
    return run


@router.get("/{run_id}/export", responses={
    200: {"content": {"text/csv": {}, "application/json": {}}, "description": "one row per (trial, epoch)"},
    404: {"model": ErrorOut}})
def export_run(run_id: RowId, session: SessionDep, format: Literal["csv", "json"] = "csv"):
    """Every (trial, epoch) row of a run as a CSV or JSON attachment."""
    _run_or_404(session, run_id)
    rows = store.export_rows(session, run_id)
    headers = {"Content-Disposition": f'attachment; filename="bitbench-run-{run_id}.{format}"'}
    if format == "json":
        return JSONResponse(rows, headers=headers)
    return Response(_csv(rows), media_type="text/csv; charset=utf-8", headers=headers)


@router.get("/{run_id}/report", response_class=Response, responses={
    200: {"content": {"application/zip": {}}, "description": "the report folder, zipped"},
    404: {"model": ErrorOut}, 503: {"model": ErrorOut, "description": "every render slot is taken: see Retry-After"}})
async def run_report(run_id: RowId, request: Request, png: bool = True, also: Annotated[
        list[Annotated[int, Field(ge=1, le=MAX_ID)]], Query(max_length=MAX_ALSO, description=(
            f"up to {MAX_ALSO} more run ids reported together with this one (e.g. one run per model size: the "
            "report then compares the sizes); such a report is rendered on every request"))] = []):  # noqa: B006
    """The run's report (RESULTS.md, figures as HTML and PNG, LaTeX table, spec, environment) as a zip.

    A finished run's archive is rendered once and stored; a running one's on every request. Renders
    are bounded per process (``BITBENCH_REPORT_RENDERS``): beyond that, 503 with ``Retry-After``."""
    service = report.reports(request.app)
    try:
        body = await (service.combined([run_id, *also], png) if also else service.archive(run_id, png))
    except report.RendersBusy as busy:
        raise http_error(status.HTTP_503_SERVICE_UNAVAILABLE, (), str(busy), "renders_busy",
                         {"Retry-After": str(busy.retry_after)}) from None
    if isinstance(body, int):
        raise http_error(status.HTTP_404_NOT_FOUND, ("query", "also"), f"run {body} not found", "not_found") \
            if body != run_id else not_found("run", run_id, "run_id")
    if body is None:
        raise not_found("run", run_id, "run_id")
    name = report.archive_name(", ".join(str(i) for i in dict.fromkeys([run_id, *also])))
    return Response(body, media_type="application/zip",
                    headers={"Content-Disposition": f'attachment; filename="{name}.zip"'})


def _csv(rows: list[dict]) -> str:
    """CSV with a header row; columns in first-seen order; nested values as JSON."""
    columns = list(dict.fromkeys(k for row in rows for k in row)) or list(_EXPORT_COLUMNS)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in row.items()})
    return buf.getvalue()
