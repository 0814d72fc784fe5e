"""Database benchmarks: the leaderboard over a database of 1,000,000 metric rows.

    python bench/api_db.py [--trials 10000] [--epochs 100] [--repeat 9] [--rounds 3] [--baseline REV]
                           [--postgres-url URL] [--no-postgres]

``bench_leaderboard(url)`` fills an empty database (migrated to head) through ``store.create_run``
with runs of a 12-estimator × 9-bit-cell grid over several data sets, marks every trial done
with a final accuracy, bulk-loads ``n_trials × epochs`` metric rows (PostgreSQL ``COPY``, SQLite
``executemany``), then times ``store.leaderboard`` (all rows, one data set, one protocol) and
``store.trial_metrics`` (one trial's curve). It runs on a SQLite file and on PostgreSQL
(``--postgres-url``, else a throwaway server from the installed binaries, as the tests start
it). Target: leaderboard p50 ≤ 100 ms. The leaderboard aggregates the trials' final accuracies
in SQL, one trial per (protocol, estimator, bits, seed); the runs use three recipes (epochs
100, 50 and 100 with SGD) per data set and repeat their seeds, so protocols split the rows and
the dedupe sets most repeats aside; the metric rows give the database a realistic size.

Planner statistics as a deployment has them: PostgreSQL's autovacuum analyzes a table after such a load
(``ANALYZE`` here, so as not to wait for it); nothing analyzes a SQLite database, so it has none.

The all-rows leaderboard is timed side by side with migration 0009's index (``ix_trials_leaderboard``,
in the dedupe's order) and with 0008's in its place, in ``--rounds`` alternating blocks of ``--repeat``
calls; ``--baseline REV`` also times ``service/store/results.py`` as it was at git revision ``REV``
(``git show``), call for call with the current one, and checks that both return the same rows.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import bindparam, func, select, text, update  # noqa: E402

from service import store  # noqa: E402
from service.db import make_engine, migrate, session_factory  # noqa: E402
from service.store.sql import dialect  # noqa: E402
from service.tables import metrics, runs, trials  # noqa: E402

TARGET_MS = 100.0
ESTIMATORS = ["approx_sign", "aqe", "clipped_ste", "dorefa", "dsq", "ede", "ewgs", "lsq", "pact", "reste", "ste",
              "xnor"]
DATASETS = ["digits", "mnist", "fashion_mnist", "cifar10"]
METRIC_COLUMNS = ("trial_id", "epoch", "train_loss", "train_acc", "val_acc", "test_acc", "lr", "epoch_seconds",
                  "images_per_s", "device", "schedule")


RECIPES = [{"epochs": 100}, {"epochs": 50}, {"epochs": 100, "optimizer": {"name": "sgd", "lr": 0.1}}]


def _grid_spec(i: int, seeds: int) -> dict:
    """Run ``i``: data sets in turn, then recipes; repeated runs of a (data set, recipe) train the same seeds."""
    recipe = RECIPES[(i // len(DATASETS)) % len(RECIPES)]
    return {"name": f"bench-{i}", "dataset": DATASETS[i % len(DATASETS)], "estimators": ESTIMATORS,
            "bits": {"w": [1, 2, 3], "a": [1, 2, 3]}, "seeds": list(range(seeds)), **recipe}


def fill(url: str, *, trials_wanted: int, epochs: int, seed: int = 0) -> dict:
    """Runs and trials through the store, final accuracies, then the metric rows in bulk; planner statistics
    where a deployment has them (PostgreSQL: autovacuum)."""
    rng = random.Random(seed)
    engine = make_engine(url)
    migrate(engine)
    sessions = session_factory(engine)
    per_seed = len(ESTIMATORS) * 9 + 1
    seeds = 4  # a run of a (data set, recipe) seen before repeats its seeds: the dedupe has work
    t0 = time.perf_counter()
    with sessions() as s:
        n, i = 0, 0
        while n < trials_wanted:
            s_needed = min(seeds, -(-(trials_wanted - n) // per_seed))
            run, _ = store.create_run(s, _grid_spec(i, s_needed))
            n += run["trial_count"]
            i += 1
        ids = s.execute(select(trials.c.id, trials.c.w_bits).order_by(trials.c.id)).all()
        start = datetime(2026, 1, 1, tzinfo=UTC)
        s.execute(update(trials).where(trials.c.id == bindparam("tid")).values(
            status="done", epochs_done=epochs, final_test_acc=bindparam("acc"), final_val_acc=bindparam("acc"),
            finished_at=bindparam("at")),
            [{"tid": tid, "acc": min(1.0, 0.5 + 0.1 * min(w, 5) + rng.gauss(0, 0.02)),
              "at": start + timedelta(seconds=rng.randrange(10**7))} for tid, w in ids])
        s.execute(update(runs).values(status="done"))
        s.commit()
    t_runs = time.perf_counter() - t0

    t0 = time.perf_counter()
    _bulk_metrics(engine, [tid for tid, _ in ids], epochs, rng)
    if engine.dialect.name == "postgresql":
        with engine.connect() as c:
            c.execute(text("ANALYZE"))
            c.commit()
    t_metrics = time.perf_counter() - t0
    with sessions() as s:
        counts = store.count_rows(s)
    engine.dispose()
    return {"counts": counts, "runs_trials_s": t_runs, "metrics_load_s": t_metrics}


def _metric_rows(trial_ids, epochs, rng):
    schedule = json.dumps({"aqe.alpha": 0.5})
    for tid in trial_ids:
        acc = rng.random()
        for e in range(1, epochs + 1):
            yield (tid, e, 1.0 / e, acc, acc, acc, 0.01 * 0.98 ** e, 1.5, 900.0, "cpu", schedule)


def _bulk_metrics(engine, trial_ids, epochs, rng, chunk=100_000) -> None:
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        cols = ", ".join(METRIC_COLUMNS)
        if engine.dialect.name == "postgresql":
            with cur.copy(f"COPY {metrics.name} ({cols}) FROM STDIN") as copy:
                for row in _metric_rows(trial_ids, epochs, rng):
                    copy.write_row(row)
        else:
            sql = f"INSERT INTO {metrics.name} ({cols}) VALUES ({', '.join('?' * len(METRIC_COLUMNS))})"
            rows = _metric_rows(trial_ids, epochs, rng)
            while batch := [r for _, r in zip(range(chunk), rows, strict=False)]:
                cur.executemany(sql, batch)
        raw.commit()
    finally:
        raw.close()


def _stats(times: list[float]) -> dict:
    return {"p50_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times)}


def _time_ms(fn, repeat: int) -> dict:
    fn()  # warm caches and the statement cache
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return _stats(times)


#: the leaderboard's index of migration 0009 and 0008's, which it replaced: (name, CREATE INDEX)
INDEXES = {
    "0009": ("ix_trials_leaderboard", "CREATE INDEX ix_trials_leaderboard ON trials "
                                      "(protocol, estimator_label, w_bits, a_bits, seed, finished_at DESC, id DESC)"),
    "0008": ("ix_trials_protocol_estimator_label_w_bits_a_bits_seed",
             "CREATE INDEX ix_trials_protocol_estimator_label_w_bits_a_bits_seed ON trials "
             "(protocol, estimator_label, w_bits, a_bits, seed)"),
}


def _use_index(engine, revision: str) -> None:
    """Leave the leaderboard index of migration ``revision`` in place of the other (PostgreSQL: analyzed)."""
    with engine.begin() as c:
        for name, _ in INDEXES.values():
            c.execute(text(f"DROP INDEX IF EXISTS {name}"))
        c.execute(text(INDEXES[revision][1]))
        if engine.dialect.name == "postgresql":
            c.execute(text("ANALYZE trials"))


def load_baseline(rev: str):
    """``service/store/results.py`` at git revision ``rev``, as a module of the store package."""
    source = subprocess.run(["git", "show", f"{rev}:service/store/results.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    spec = importlib.util.spec_from_loader("service.store._baseline_results", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "service.store"
    exec(compile(source, f"{rev}:service/store/results.py", "exec"), module.__dict__)
    return module


def _same_rows(a: list[dict], b: list[dict]) -> bool:
    """The baseline's rows (its keys) equal the current ones, floats to 1e-9 relative."""
    return len(a) == len(b) and all(
        math.isclose(x[k], y[k], rel_tol=1e-9) if isinstance(x[k], float) and y[k] is not None else x[k] == y[k]
        for x, y in zip(a, b, strict=True) for k in x)


def _server_cpu_s(s) -> float | None:
    """CPU seconds the session's PostgreSQL backend has used (``/proc``: a server on this machine), else None."""
    if dialect(s) != "postgresql":
        return None
    try:
        pid = s.execute(text("SELECT pg_backend_pid()")).scalar_one()
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _leaderboard_side_by_side(engine, s, *, repeat: int, rounds: int, baseline) -> dict:
    """All-rows leaderboard per (index revision, code): wall times of ``rounds`` alternating blocks of ``repeat``
    calls per index, the baseline code's call right after each current one; and the CPU time per call, this
    process's plus (PostgreSQL on this machine) the server backend's, which other jobs on the machine inflate
    less than the wall time (the lowest block mean)."""
    codes = {**({"baseline": baseline.leaderboard} if baseline else {}), "current": store.leaderboard}
    times: dict[tuple[str, str], list[float]] = {}
    cpu: dict[tuple[str, str], list[float]] = {}
    for _ in range(rounds):
        for revision in ("0008", "0009"):
            s.commit()  # the session's open transaction would hold back DROP INDEX on PostgreSQL
            _use_index(engine, revision)
            for code, fn in codes.items():
                fn(s)  # warm caches and the statement cache
                server0, cpu0 = _server_cpu_s(s), time.process_time()
                for _ in range(repeat):
                    t0 = time.perf_counter()
                    fn(s)
                    times.setdefault((revision, code), []).append((time.perf_counter() - t0) * 1000)
                used = time.process_time() - cpu0 + ((_server_cpu_s(s) or 0.0) - (server0 or 0.0))
                cpu.setdefault((revision, code), []).append(used / repeat * 1000)
    return {f"{revision} index, {code} code": {**_stats(t), "cpu_ms": min(cpu[(revision, code)])}
            for (revision, code), t in times.items()}


def _pooled(s) -> list:
    """The leaderboard's query before protocols (GROUP BY data set, model, bits, label; no dedupe): the baseline."""
    keys = (runs.c.dataset, runs.c.model, trials.c.w_bits, trials.c.a_bits, trials.c.estimator_label)
    x = trials.c.final_test_acc
    return s.execute(select(*keys, func.count(x), func.avg(x), func.avg(x * x))
                     .select_from(trials.join(runs, runs.c.id == trials.c.run_id))
                     .where(trials.c.status == "done", x.isnot(None)).group_by(*keys)).all()


def bench_leaderboard(url: str, *, n_trials: int = 10_000, epochs: int = 100, repeat: int = 9, rounds: int = 3,
                      baseline=None) -> dict:
    """Fill the empty database at ``url`` (``n_trials × epochs`` metric rows) and time the leaderboard.

    Returns ``{"dialect", "counts", "load": {...}, "leaderboard": {p50_ms, min_ms, max_ms, rows, ...},
    "side_by_side": {"<rev> index, <code> code": {...}}, "leaderboard_one_dataset": {...}, "trial_metrics": {...},
    "target_ms", "ok"}``; ``leaderboard`` is the current code with 0009's index, from ``side_by_side``."""
    load = fill(url, trials_wanted=n_trials, epochs=epochs)
    engine = make_engine(url)
    sessions = session_factory(engine)
    with sessions() as s:
        board = store.leaderboard(s)
        protocol = board[0]["protocol"]
        one_trial = s.execute(select(trials.c.id).order_by(trials.c.id.desc()).limit(1)).scalar_one()
        side = _leaderboard_side_by_side(engine, s, repeat=repeat, rounds=rounds, baseline=baseline)
        result = {
            "dialect": engine.dialect.name,
            "counts": load.pop("counts"),
            "load": load,
            "leaderboard": {**side["0009 index, current code"], "rows": len(board),
                            "protocols": len({r["protocol"] for r in board}),
                            "set_aside": sum(r["set_aside"] for r in board)},
            "side_by_side": side,
            "baseline_same_rows": _same_rows(baseline.leaderboard(s), board) if baseline else None,
            "pooled_baseline": _time_ms(lambda: _pooled(s), repeat),
            "leaderboard_one_dataset": _time_ms(lambda: store.leaderboard(s, dataset="mnist"), repeat),
            "leaderboard_one_protocol": _time_ms(lambda: store.leaderboard(s, protocol=protocol), repeat),
            "protocols": _time_ms(lambda: store.protocols(s, dataset="mnist", model="digits_net"), repeat),
            "trial_metrics": _time_ms(lambda: store.trial_metrics(s, one_trial), repeat),
        }
    engine.dispose()
    result["target_ms"] = TARGET_MS
    result["ok"] = result["leaderboard"]["p50_ms"] <= TARGET_MS
    return result


def _table(results: list[dict]) -> str:
    lines = ["| database | runs / trials / metrics | load (s) | leaderboard p50 (min–max) | one data set p50 | "
             "one protocol p50 | protocol choices p50 | one trial's metrics p50 | pooled query (no protocols) p50 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        c, lb = r["counts"], r["leaderboard"]
        lines.append(
            f"| {r['dialect']} | {c['runs']} / {c['trials']:,} / {c['metrics']:,} | "
            f"{r['load']['runs_trials_s'] + r['load']['metrics_load_s']:.1f} | "
            f"{lb['p50_ms']:.1f} ms ({lb['min_ms']:.1f}–{lb['max_ms']:.1f}), {lb['rows']} rows of {lb['protocols']} "
            f"protocols, {lb['set_aside']:,} repeats set aside | {r['leaderboard_one_dataset']['p50_ms']:.1f} ms | "
            f"{r['leaderboard_one_protocol']['p50_ms']:.1f} ms | {r['protocols']['p50_ms']:.1f} ms | "
            f"{r['trial_metrics']['p50_ms']:.2f} ms | {r['pooled_baseline']['p50_ms']:.1f} ms |")
    return "\n".join(lines)


def _side_by_side_table(results: list[dict]) -> str:
    """The all-rows leaderboard per index and code: wall p50 (min) and CPU per call, each × the current code with
    0009's index."""
    head = " | ".join(f"{r['dialect']}: p50 (min), ms | × | CPU ms a call | ×" for r in results)
    lines = [f"| all-rows leaderboard | {head} |", "|---|" + "---:|---:|---:|---:|" * len(results)]
    for name in results[0]["side_by_side"]:
        cells = []
        for r in results:
            t, after = r["side_by_side"][name], r["side_by_side"]["0009 index, current code"]
            cells.append(f"{t['p50_ms']:.1f} ({t['min_ms']:.1f}) | {t['p50_ms'] / after['p50_ms']:.2f} | "
                         f"{t['cpu_ms']:.1f} | {t['cpu_ms'] / after['cpu_ms']:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    same = [r["baseline_same_rows"] for r in results if r["baseline_same_rows"] is not None]
    if same:
        lines.append(f"\nthe baseline code returns the same rows: {'yes' if all(same) else 'NO'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=10_000)
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--rounds", type=int, default=3, help="alternating blocks per index in the side-by-side table")
    ap.add_argument("--baseline", metavar="REV", default=None,
                    help="also time service/store/results.py as it was at this git revision")
    ap.add_argument("--postgres-url", default=None, help="an empty PostgreSQL database (default: a throwaway server)")
    ap.add_argument("--no-postgres", action="store_true")
    args = ap.parse_args(argv)
    kw = {"n_trials": args.trials, "epochs": args.epochs, "repeat": args.repeat, "rounds": args.rounds,
          "baseline": load_baseline(args.baseline) if args.baseline else None}
    load_before = os.getloadavg()
    results = []
    with tempfile.TemporaryDirectory(prefix="bitbench-bench-") as d:
        results.append(bench_leaderboard(f"sqlite:///{d}/bench.sqlite", **kw))
    if not args.no_postgres:
        if args.postgres_url:
            results.append(bench_leaderboard(args.postgres_url, **kw))
        else:
            from tests.db_fixtures import PostgresDatabases, TempPostgres, find_postgres_bin

            bindir = find_postgres_bin()
            if bindir is None:
                print("PostgreSQL binaries not found (scripts/system-deps.sh): skipping PostgreSQL", file=sys.stderr)
            else:
                server = TempPostgres(bindir).start()
                try:
                    dbs = PostgresDatabases(server.url)
                    results.append(bench_leaderboard(dbs.new(), **kw))
                    dbs.admin.dispose()
                finally:
                    server.stop()
    print(f"{platform.node()} · Python {platform.python_version()} · target leaderboard p50 ≤ {TARGET_MS:.0f} ms · "
          f"load average {load_before[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
          + (f" · baseline {args.baseline}" if args.baseline else "") + "\n")
    print(_table(results))
    print()
    print(_side_by_side_table(results))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
