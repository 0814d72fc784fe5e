"""What finished trials add up to: the leaderboard, a run's results and export, the data sets and
models present, and a finished run's report archive (rendered once by ``service.report``, kept
under the run's :func:`results_fingerprint`)."""
from __future__ import annotations

import hashlib
import json
import math
from typing import cast

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from workers.records import (
    DEFAULT_RANK_METRIC,
    METRIC_KEYS,
    TRIAL_KEYS,
    LeaderboardRow,
    Status,
    TrialResult,
    config_sort_key,
    metric_field,
)

from ..tables import metrics, report_archives, runs, trials, utcnow
from .sql import dialect, record, unindexed, upsert_insert


def _rank_metric(metric: str):
    """The trials column of ``metric`` (``final`` or ``selected``, :data:`workers.records.RANK_METRIC_FIELDS`)."""
    return trials.c[metric_field(metric)]


def _finished_results(metric: str, *, status=trials.c.status) -> list:
    """The conditions of a trial that counts: done, with a value of ``metric``."""
    return [status == Status.DONE, _rank_metric(metric).isnot(None)]


# -- a run's results --------------------------------------------------------------------------
def run_results(s: Session, run_id: int) -> list[TrialResult]:
    """The run's finished (``done``) trials as Trial records plus ``"final"`` (the trainer's
    final dict), in grid order: the input of the accuracy-versus-bits figures."""
    rows = s.execute(select(trials).where(trials.c.run_id == run_id, trials.c.status == Status.DONE)
                     .order_by(trials.c.id))
    return [cast(TrialResult, {**record(r, TRIAL_KEYS), "final": r.final or {}}) for r in rows]


def export_rows(s: Session, run_id: int) -> list[dict]:
    """One flat row per (trial, epoch) of the run: the trial's identity, then the epoch's
    metrics; schedule values become ``schedule.<name>`` columns."""
    q = (select(trials.c.key.label("trial_key"), trials.c.estimator, trials.c.estimator_label, trials.c.w_bits,
                trials.c.a_bits, trials.c.seed, *[metrics.c[f] for f in METRIC_KEYS])
         .join(metrics, metrics.c.trial_id == trials.c.id)
         .where(trials.c.run_id == run_id).order_by(trials.c.id, metrics.c.epoch))
    out = []
    for row in s.execute(q):
        rec = dict(row._mapping)
        schedule = rec.pop("schedule") or {}
        out.append({"run_id": run_id, **rec, **{f"schedule.{k}": v for k, v in schedule.items()}})
    return out


def datasets_models(s: Session, *, metric: str = DEFAULT_RANK_METRIC) -> list[tuple[str, str]]:
    """The sorted distinct ``(dataset, model)`` pairs with a finished result of ``metric``: the
    leaderboard's groups, in one ``SELECT DISTINCT`` (the leaderboard is not computed)."""
    q = (select(runs.c.dataset, runs.c.model).distinct()
         .select_from(trials.join(runs, runs.c.id == trials.c.run_id))
         .where(*_finished_results(metric)).order_by(runs.c.dataset, runs.c.model))
    return [(r.dataset, r.model) for r in s.execute(q)]


def protocols(s: Session, *, dataset: str | None = None, model: str | None = None,
              metric: str = DEFAULT_RANK_METRIC) -> list[tuple[str, str]]:
    """The ``(protocol, label)`` pairs with a finished result of ``metric`` (of ``dataset`` / ``model``),
    sorted by label: the leaderboard page's protocol choices."""
    q = (select(trials.c.protocol, trials.c.protocol_label).distinct()
         .select_from(trials.join(runs, runs.c.id == trials.c.run_id))
         .where(*_finished_results(metric), *([runs.c.dataset == dataset] if dataset is not None else []),
                *([runs.c.model == model] if model is not None else []))
         .order_by(trials.c.protocol_label, trials.c.protocol))
    return [(r.protocol, r.protocol_label) for r in s.execute(q)]


# -- report archives --------------------------------------------------------------------------
def results_fingerprint(s: Session, run_id: int) -> tuple[str, str] | None:
    """``(status, SHA-256 hex)`` of what a run's report is drawn from, None for an unknown run.

    The digest covers the run's row (name, spec, status, times, error), its trials per status
    (count, epochs, sums of the final accuracies, latest start and finish) and its metric rows
    (count, highest id): three indexed aggregate queries. Any write a report could show
    changes it; a finished run's never changes unless its rows are edited.
    """
    run = s.execute(select(runs.c.name, runs.c.spec_hash, runs.c.status, runs.c.created_at, runs.c.started_at,
                           runs.c.finished_at, runs.c.error, runs.c.trial_count).where(runs.c.id == run_id)).first()
    if run is None:
        return None
    by_status = s.execute(
        select(trials.c.status, func.count(), func.sum(trials.c.epochs_done), func.sum(trials.c.final_test_acc),
               func.sum(trials.c.final_val_acc), func.max(trials.c.started_at), func.max(trials.c.finished_at))
        .where(trials.c.run_id == run_id).group_by(trials.c.status).order_by(trials.c.status)).all()
    epochs = s.execute(select(func.count(metrics.c.id), func.max(metrics.c.id))
                       .join(trials, trials.c.id == metrics.c.trial_id).where(trials.c.run_id == run_id)).one()
    state = json.dumps([list(run), [list(r) for r in by_status], list(epochs)], default=str)
    return run.status, hashlib.sha256(state.encode()).hexdigest()


def report_archive(s: Session, run_id: int, png: bool, fingerprint: str) -> bytes | None:
    """The stored report archive of the run, if it was built from ``fingerprint``."""
    return s.execute(select(report_archives.c.body).where(
        report_archives.c.run_id == run_id, report_archives.c.png == png,
        report_archives.c.fingerprint == fingerprint)).scalar()


def save_report_archive(s: Session, run_id: int, png: bool, fingerprint: str, body: bytes) -> None:
    """Keep ``body`` as the run's report archive (replacing an older one); commits."""
    values = {"fingerprint": fingerprint, "body": body, "created_at": utcnow()}
    s.execute(upsert_insert(s, report_archives).values(run_id=run_id, png=png, **values)
              .on_conflict_do_update(index_elements=["run_id", "png"], set_=values))
    s.commit()


# -- leaderboard ------------------------------------------------------------------------------
def leaderboard(s: Session, *, dataset: str | None = None, model: str | None = None, protocol: str | None = None,
                run_id: int | list[int] | None = None, metric: str = DEFAULT_RANK_METRIC) -> list[LeaderboardRow]:
    """Estimators ranked by mean test accuracy over seeds, per protocol × bits (``workers.protocol``:
    trials trained under different recipes are never pooled).

    ``metric`` (:data:`workers.records.RANK_METRIC_FIELDS`): ``final``, the trained network's test accuracy, or
    ``selected``, the test accuracy at the epoch with the best validation accuracy; each row
    says which.

    Within a protocol one trial per (estimator label, w_bits, a_bits, seed) counts: the latest
    finished (``ROW_NUMBER()`` by finish time, then id, descending, the order of ``ix_trials_leaderboard``);
    ``set_aside`` counts the older repeats left out. ``grid`` is the quantizer grid the label's trials
    quantize to (``estimators.grids``; None for the float reference). Count, mean and spread of the
    counted trials are aggregated in SQL over ``done`` trials (with the mean packed export size and the
    lowest packed-engine agreement, where trials have them); the 95% interval is
    ``mean ± t(0.975, n−1)·std/√n`` (:func:`dashboard.stats.t_interval`) clipped to [0, 1] (sample std;
    None when n < 2) and rank 1 is the best mean within its (protocol, w_bits, a_bits) (ties share a
    rank; ``best`` marks rank 1).
    Rows come ordered by dataset, model, protocol label, then w_bits + a_bits (the float reference
    last), w_bits, a_bits, rank. ``run_id`` restricts it to one run's trials, or a list of runs' (a study's
    report: runs of one protocol are ranked together, a seed trained by two of them counts once)."""
    from dashboard.stats import t_interval  # on first use: the dashboard package loads plotly

    x = _rank_metric(metric)
    cell = (trials.c.protocol, trials.c.estimator_label, trials.c.w_bits, trials.c.a_bits)  # ix_trials_leaderboard's
    latest = func.row_number().over(partition_by=(*cell, trials.c.seed),
                                    order_by=(trials.c.finished_at.desc().nulls_last(), trials.c.id.desc()))
    of_runs = [*([runs.c.dataset == dataset] if dataset is not None else []),
               *([runs.c.model == model] if model is not None else [])]
    ranked = (select(*cell, trials.c.protocol_label, trials.c.grid, trials.c.run_id, x.label("x"),
                     trials.c.packed_bytes, trials.c.packed_agreement, latest.label("pick"))
              # the status picks no index: ix_trials_leaderboard gives the rows in the window's order
              .where(*_finished_results(metric, status=unindexed(s, trials.c.status)),
                     *([trials.c.run_id.in_(select(runs.c.id).where(*of_runs))] if of_runs else []),
                     *([trials.c.protocol == protocol] if protocol is not None else []),
                     *([trials.c.run_id.in_([run_id] if isinstance(run_id, int) else run_id)]
                       if run_id is not None else []))
              .subquery())
    counted = ranked.c.pick == 1
    y = case((counted, ranked.c.x))
    spread = func.stddev_samp(y) if dialect(s) == "postgresql" else func.avg(y * y)
    # a protocol names its data set and model and has one label, an estimator label names its grid (its ``grid``
    # parameter, else the estimator's own): carried, not grouped by; data set and model from any one of its runs
    carried = [func.max(ranked.c[c]).label(c) for c in ("protocol_label", "grid", "run_id")]
    keys = ranked.c["protocol", "estimator_label", "w_bits", "a_bits"]  # the window's order
    cells = (select(*keys, *carried, func.count(y).label("n"), func.count().label("total"), func.avg(y).label("mean"),
                    spread.label("spread"), func.avg(case((counted, ranked.c.packed_bytes))).label("packed_bytes"),
                    func.min(case((counted, ranked.c.packed_agreement))).label("packed_agreement"))
             .group_by(*keys).subquery())
    q = (select(*cells.c["protocol", "protocol_label"], runs.c.dataset, runs.c.model,
                *cells.c["w_bits", "a_bits", "estimator_label", "grid", "n", "total", "mean", "spread", "packed_bytes",
                         "packed_agreement"])
         .join_from(cells, runs, runs.c.id == cells.c.run_id))
    postgres = dialect(s) == "postgresql"
    rows: list[dict] = []
    # unpacked: a Row's attribute read costs ~1 µs, unpacking ~0.1 µs a row (BENCHMARKS.md, issue 14)
    for (prot, prot_label, data, net, w, a, label, grid, n, total, mean, spread, packed_bytes,
         packed_agreement) in s.execute(q):
        n, mean = int(n), float(mean)
        std = ci_low = ci_high = None
        if n >= 2:
            if postgres:
                std = float(spread)
            else:  # E[x²] − E[x]², made unbiased
                std = math.sqrt(max(float(spread) - mean * mean, 0.0) * n / (n - 1))
            interval = t_interval(mean, std, n)
            if interval is not None:
                ci_low, ci_high = max(interval[0], 0.0), min(interval[1], 1.0)  # an accuracy stays in [0, 1]
        rows.append({"protocol": prot, "protocol_label": prot_label, "dataset": data, "model": net, "w_bits": w,
                     "a_bits": a, "estimator_label": label, "grid": grid, "metric": metric, "n": n,
                     "set_aside": int(total) - n,
                     "mean": mean, "std": std, "ci_low": ci_low, "ci_high": ci_high,
                     "packed_bytes": None if packed_bytes is None else round(float(packed_bytes)),
                     "packed_agreement": None if packed_agreement is None else float(packed_agreement)})
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["protocol"], row["w_bits"], row["a_bits"]), []).append(row)
    for group in groups.values():
        group.sort(key=lambda g: -g["mean"])
        for i, row in enumerate(group):
            same = i and row["mean"] == group[i - 1]["mean"]
            row["rank"] = group[i - 1]["rank"] if same else i + 1
            row["best"] = row["rank"] == 1

    rows.sort(key=lambda row: (row["dataset"], row["model"], row["protocol_label"], row["protocol"],
                               *config_sort_key((row["w_bits"], row["a_bits"])), row["rank"], row["estimator_label"]))
    return cast(list[LeaderboardRow], rows)
