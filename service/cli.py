"""``bitbench``: the command line client of a bitbench server.

    bitbench submit spec.json              # prints the run id
    bitbench submit --dry-run spec.json    # trial count, GPU time estimate, data files; queues nothing
    bitbench status 3                      # status and progress
    bitbench wait 3                        # progress bar; exit 0 done, 1 failed or cancelled
    bitbench leaderboard --dataset cifar10 --model convnet_a
    bitbench export 3 --format csv --out run3.csv
    bitbench report 3 4 5 6 --out docs/results  # one report over several runs (e.g. one per model size)
    bitbench cancel 3

The server comes from ``--server`` / ``$BITBENCH_SERVER`` (default http://127.0.0.1:8000), the
bearer token for writes from ``--token`` / ``$BITBENCH_API_TOKEN``. A plain HTTP client: it
imports nothing of the service (only the records' vocabulary, :mod:`workers.records`), so it runs
without torch or Ray. Problems (server unreachable,
token missing or refused, invalid spec, unknown run) are reported on stderr with exit code 2.
"""
from __future__ import annotations

import json
import time
from enum import Enum, StrEnum
from itertools import groupby
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn

import httpx
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from workers.records import DEFAULT_RANK_METRIC, FINISHED, RANK_METRIC_FIELDS, Status, config_label

DEFAULT_SERVER = "http://127.0.0.1:8000"
EXIT_PROBLEM = 2
BUSY_RETRIES, BUSY_WAIT_S = 6, 30.0  # a busy server's 503 + Retry-After: how often and how long to wait

app = typer.Typer(name="bitbench", no_args_is_help=True, add_completion=False,
                  help="Queue and follow bitbench sweeps over HTTP.")


class Format(StrEnum):
    csv = "csv"
    json = "json"


RankMetric = Enum("RankMetric", {m: m for m in RANK_METRIC_FIELDS}, type=str)  # type: ignore[misc]

METRIC_TITLES = {"final": "final test accuracy (%)", "selected": "test accuracy at the best validation epoch (%)"}


def fail(message: str) -> NoReturn:
    """Report ``message`` on stderr (plain text: no markup) and exit with EXIT_PROBLEM."""
    typer.echo(f"bitbench: {message}", err=True)
    raise typer.Exit(EXIT_PROBLEM)


# -- HTTP ---------------------------------------------------------------------------------------
def field_path(loc: list) -> str:
    """``["body", "bits", 0, "w"]`` → ``bits[0].w``; the part of the request is dropped."""
    parts = loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += f".{p}" if out else str(p)
    return out or "(body)"


def _errors(response: httpx.Response) -> list[tuple[str, str]]:
    """(field path, message) pairs of an error body; FastAPI's ``detail`` list or string."""
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    if isinstance(detail, list):
        return [(field_path(e.get("loc", [])), str(e.get("msg", e))) for e in detail if isinstance(e, dict)]
    if detail:
        return [("", str(detail))]
    text = response.text.strip().splitlines()
    return [("", text[0][:200] if text else response.reason_phrase)]


class Client:
    """Requests to one server; every failure becomes a one-line :func:`fail`."""

    def __init__(self, server: str, token: str | None, timeout: float = 30.0):
        self.server = server.rstrip("/")
        self.token = token or None
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self.http = httpx.Client(base_url=self.server, headers=headers, timeout=timeout)

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        """The response; a 503 with ``Retry-After`` (the server is busy, e.g. every report render slot is
        taken) is retried after the time it names (at most BUSY_WAIT_S), up to BUSY_RETRIES times."""
        for attempt in range(BUSY_RETRIES + 1):
            response = self._send(method, path, **kwargs)
            wait = _retry_after(response)
            if wait is None or attempt == BUSY_RETRIES:
                break
            typer.echo(f"bitbench is busy ({method} {path}); trying again in {wait:g} s", err=True)
            time.sleep(wait)
        if response.status_code >= 400:
            self._refuse(response, method, path)
        return response

    def _send(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            return self.http.request(method, path, **kwargs)
        except (httpx.ConnectError, httpx.ConnectTimeout) as e:
            fail(f"cannot reach bitbench at {self.server}: {e}")
        except httpx.TimeoutException:
            fail(f"bitbench at {self.server} did not answer in time ({method} {path})")
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as e:
            fail(f"invalid server URL {self.server!r}: {e}")
        except httpx.HTTPError as e:
            fail(f"request to {self.server}{path} failed: {e}")

    def _refuse(self, response: httpx.Response, method: str, path: str) -> NoReturn:
        code, errors = response.status_code, _errors(response)
        if code == 401 and not self.token:
            fail("the server needs a token: set BITBENCH_API_TOKEN or pass --token")
        if code == 401:
            fail("the token was refused")
        if code == 404:
            # the API names what is missing ("run 5 not found"); an unknown route only says "Not Found"
            named = [msg for where, msg in errors if where]
            fail("; ".join(named) if named else f"not found: {method} {path}")
        if code == 422:
            lines = "\n".join(f"  {where}: {msg}" if where else f"  {msg}" for where, msg in errors)
            fail(f"the server refused the request ({len(errors)} error{'s' * (len(errors) != 1)}):\n{lines}")
        fail(f"{method} {path}: {code} {response.reason_phrase}: " + "; ".join(m for _, m in errors))

    @staticmethod
    def body(response: httpx.Response) -> Any:
        try:
            return response.json()
        except ValueError:
            fail(f"{response.url} did not answer with JSON: is it a bitbench server?")

    def get(self, path: str, **params) -> Any:
        return self.body(self.request("GET", path, params={k: v for k, v in params.items() if v is not None}))


def _retry_after(response: httpx.Response) -> float | None:
    """Seconds to wait before retrying a 503 that says when (``Retry-After`` in seconds), else None."""
    if response.status_code != 503:
        return None
    try:
        return min(max(float(response.headers["retry-after"]), 0.0), BUSY_WAIT_S)
    except (KeyError, ValueError):
        return None


def _client(ctx: typer.Context) -> Client:
    return ctx.obj


@app.callback()
def main(
    ctx: typer.Context,
    server: Annotated[str, typer.Option(envvar="BITBENCH_SERVER", help="bitbench server URL")] = DEFAULT_SERVER,
    token: Annotated[str | None, typer.Option(envvar="BITBENCH_API_TOKEN", show_default=False,
                                              help="bearer token for writes")] = None,
) -> None:
    ctx.obj = Client(server, token)
    ctx.call_on_close(ctx.obj.http.close)


# -- commands -----------------------------------------------------------------------------------
def _read_spec(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        fail(f"cannot read spec {path}: {getattr(e, 'strerror', None) or e}")
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        fail(f"spec {path} is not JSON: line {e.lineno} column {e.colno}: {e.msg}")
    return text


@app.command()
def submit(
    ctx: typer.Context,
    spec: Annotated[Path, typer.Argument(metavar="SPEC.json", help="experiment spec (JSON), or a JSON list of specs")],
    idempotency_key: Annotated[str | None, typer.Option(
        help="repeat a submission safely: the same key and spec return the first run")] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="validate and expand each spec, queue nothing: print the trial count, the estimated "
                          "single-GPU time and the data files it needs")] = False,
) -> None:
    """Queue an experiment spec (or each spec of a list, as in studies/); prints the run ids."""
    specs = json.loads(_read_spec(spec))
    specs = specs if isinstance(specs, list) else [specs]
    client = _client(ctx)
    if dry_run:
        for one in specs:
            r = client.request("POST", "/runs", params={"dry_run": 1}, content=json.dumps(one).encode(),
                               headers={"Content-Type": "application/json"})
            typer.echo(_dry_run_text(client.body(r)))
        return
    for i, one in enumerate(specs):
        headers = {"Content-Type": "application/json"}
        if idempotency_key:
            headers["Idempotency-Key"] = idempotency_key if len(specs) == 1 else f"{idempotency_key}-{i}"
        r = client.request("POST", "/runs", content=json.dumps(one).encode(), headers=headers)
        run = client.body(r)
        again = " (already queued with this idempotency key)" if r.status_code == 200 else ""
        typer.echo(f"run {run['id']}: {run['trial_count']} trials, {run['status']}{again}", err=True)
        typer.echo(run["id"])


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def _dry_run_text(plan: dict) -> str:
    """A dry run's answer as lines: trials, GPU time estimate, data files (nothing was queued)."""
    labels = ", ".join(f"{label} {n}" for label, n in plan["trials_by_label"].items())
    seconds = plan["estimated_gpu_s"]
    gpu = f"{_duration(seconds)} ({plan['estimate']})" if seconds is not None else f"unknown: {plan['estimate']}"
    files = "\n".join(f"  {f}" for f in plan["data_files"]) or "  none (bundled or generated data)"
    return (f"{plan['name']}: {plan['trials']} trials ({labels}) × {plan['epochs']} epochs on "
            f"{plan['dataset']} / {plan['model']}; nothing queued (dry run)\n"
            f"estimated single-GPU time: {gpu}\ndata files (under the data directory):\n{files}")


def _progress_table(run: dict) -> Table:
    counts = run["progress"]
    title = escape(f"run {run['id']} · {run['name']} · {run['dataset']} / {run['model']}")
    table = Table(title=title, title_justify="left")
    for column in ("status", *counts, "trials"):
        table.add_column(column, justify="left" if column == "status" else "right")
    table.add_row(run["status"], *(str(counts[k]) for k in counts), str(run["trial_count"]))
    return table


@app.command()
def status(ctx: typer.Context, run_id: Annotated[int, typer.Argument(metavar="RUN")]) -> None:
    """A run's status and progress by trial status."""
    run = _client(ctx).get(f"/runs/{run_id}")
    out = Console()
    out.print(_progress_table(run))
    if run.get("epochs"):
        out.print(f"epochs stored: {run['epochs']['done']} / {run['epochs']['total']}", highlight=False)
    if run.get("cancel_requested") and run["status"] == Status.RUNNING:
        out.print("cancel requested: trials stop at their next epoch", highlight=False)
    if run.get("error"):
        out.print(f"error: {run['error']}", markup=False, highlight=False)


@app.command()
def wait(
    ctx: typer.Context,
    run_id: Annotated[int, typer.Argument(metavar="RUN")],
    interval: Annotated[float, typer.Option(min=0.05, help="seconds between polls")] = 2.0,
    timeout: Annotated[float, typer.Option(min=0, help="give up after this many seconds (0: never)")] = 0,
) -> None:
    """Follow a run until it ends: exit 0 when done, 1 when failed or cancelled."""
    client = _client(ctx)
    deadline = time.monotonic() + timeout if timeout else None
    columns = (TextColumn("run {task.fields[run]} {task.fields[status]}"), BarColumn(),
               MofNCompleteColumn(), TextColumn("trials {task.percentage:>3.0f}%"), TimeElapsedColumn())
    run = client.get(f"/runs/{run_id}")  # an unknown run fails before the bar appears
    with Progress(*columns, console=Console()) as bar:
        task = bar.add_task("", total=run["trial_count"], run=run_id, status=run["status"])
        while True:
            counts = run["progress"]
            bar.update(task, total=run["trial_count"], status=run["status"],
                       completed=sum(counts.get(s, 0) for s in FINISHED))
            if run["status"] in FINISHED:
                break
            if deadline is not None and time.monotonic() > deadline:
                bar.stop()
                fail(f"run {run_id} is still {run['status']} after {timeout:g} s")
            time.sleep(interval)
            run = client.get(f"/runs/{run_id}")
    if run["status"] != Status.DONE:
        why = f": {run['error'].strip().splitlines()[-1]}" if run.get("error") else ""
        typer.echo(f"run {run_id} {run['status']}{why}", err=True)
        raise typer.Exit(1)


def _cell(row: dict) -> tuple:
    """A leaderboard row's grid cell: data set, model, protocol, weight and activation bits."""
    return row["dataset"], row["model"], row.get("protocol_label", ""), row.get("protocol", ""), row["w_bits"], \
        row["a_bits"]


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


@app.command()
def leaderboard(
    ctx: typer.Context,
    dataset: Annotated[str | None, typer.Option(help="only this data set")] = None,
    model: Annotated[str | None, typer.Option(help="only this model")] = None,
    protocol: Annotated[str | None, typer.Option(
        help="only this protocol (its id, as the tables' captions show)")] = None,
    metric: Annotated[RankMetric, typer.Option(
        help="final: the trained network's test accuracy; selected: at the best validation epoch")
    ] = RankMetric[DEFAULT_RANK_METRIC],
) -> None:
    """Estimators ranked by mean test accuracy (final or validation-selected), per protocol and bit
    configuration: one table per protocol (the recipe: data set, model, epochs, optimizer, ...)."""
    rows = _client(ctx).get("/leaderboard", dataset=dataset, model=model, protocol=protocol, metric=metric.value)
    out = Console()
    if not rows:
        scope = " / ".join(x for x in (dataset, model, protocol) if x) or "any data set"
        out.print(f"no finished trials for {scope} yet", highlight=False)
        return
    rows = sorted(rows, key=lambda r: (*_cell(r), r["rank"]))
    for (_, _, label, pid), cell_rows in groupby(rows, key=lambda r: _cell(r)[:4]):
        group = list(cell_rows)
        set_aside = sum(r.get("set_aside", 0) for r in group)
        caption = f"protocol {pid}" + (f"; {set_aside} older repeat(s) of a seed set aside" if set_aside else "")
        table = Table(title=escape(f"{label} — {METRIC_TITLES[metric.value]}"), title_justify="left",
                      caption=escape(caption), caption_justify="left")
        columns: tuple[tuple[str, Literal["left", "right"]], ...] = (
            ("bits", "left"), ("rank", "right"), ("estimator", "left"), ("grid", "left"), ("mean", "right"),
            ("± std", "right"),
            ("95% CI", "right"), ("n", "right"))
        for name, justify in columns:
            table.add_column(name, justify=justify, overflow="fold")
        for i, (_, cells) in enumerate(groupby(group, key=_cell)):
            if i:
                table.add_section()
            for j, r in enumerate(cells):
                ci = "–" if r.get("ci_low") is None else f"{_pct(r['ci_low'])}–{_pct(r['ci_high'])}"
                bits = "" if j else config_label((r["w_bits"], r["a_bits"]))
                values = (bits, r["rank"], r["estimator_label"], r.get("grid") or "–", _pct(r["mean"]),
                          _pct(r.get("std")), ci, r["n"])  # labels such as aqe[backward=alg1] are text, not markup
                table.add_row(*(Text(str(v)) for v in values), style="bold" if r.get("best") else None)
        out.print(table)


@app.command()
def export(
    ctx: typer.Context,
    run_id: Annotated[int, typer.Argument(metavar="RUN")],
    format: Annotated[Format, typer.Option("--format", "-f", case_sensitive=False)] = Format.csv,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="write here instead of stdout")] = None,
) -> None:
    """Every (trial, epoch) row of a run as CSV or JSON."""
    body = _client(ctx).request("GET", f"/runs/{run_id}/export", params={"format": format.value}).content
    if out is None:
        typer.echo(body.decode("utf-8"), nl=False)
        return
    try:
        out.write_bytes(body)
    except OSError as e:
        fail(f"cannot write {out}: {e.strerror or e}")
    typer.echo(f"wrote {len(body)} bytes to {out}", err=True)


@app.command()
def report(
    ctx: typer.Context,
    run_ids: Annotated[list[int], typer.Argument(metavar="RUN...", help="one run, or several reported together")],
    out: Annotated[Path, typer.Option("--out", "-o", help="folder to write the report into")] = Path("."),
) -> None:
    """A run's report folder: RESULTS.md, figures (PNG + HTML), LaTeX table, spec, machine. Several runs
    (e.g. one per model size of a capacity study) give one report over them all."""
    import io
    import zipfile

    first, *also = run_ids
    body = _client(ctx).request("GET", f"/runs/{first}/report", params={"also": also} if also else None,
                                timeout=300).content
    try:
        with zipfile.ZipFile(io.BytesIO(body)) as z:
            names = z.namelist()
            z.extractall(out)
    except (zipfile.BadZipFile, OSError) as e:
        fail(f"cannot unpack the report into {out}: {e}")
    folder = out / names[0].split("/")[0] if names else out
    typer.echo(f"wrote {len(names)} files to {folder}", err=True)
    typer.echo(folder)


@app.command()
def cancel(ctx: typer.Context, run_id: Annotated[int, typer.Argument(metavar="RUN")]) -> None:
    """Cancel a run: a queued one at once, a running one at its trials' next epoch."""
    client = _client(ctx)
    run = client.body(client.request("POST", f"/runs/{run_id}/cancel", json={}))
    if run["status"] == Status.RUNNING:
        typer.echo(f"run {run_id}: cancel requested; running trials stop at their next epoch")
    else:
        typer.echo(f"run {run_id}: {run['status']}")


if __name__ == "__main__":
    app()
