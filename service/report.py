"""Build a run's report folder from the database (``bitbench report RUN``, GET /runs/{id}/report)."""
from __future__ import annotations

import io
import os
import platform
import sys
import zipfile
from importlib import metadata
from pathlib import Path

from sqlalchemy.orm import Session

from dashboard.report import write_report

from . import store


def environment(trials: list[dict]) -> dict:
    """Versions and machine the numbers came from (this process's, plus the trials' devices)."""

    def version(pkg: str) -> str:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return "not installed"

    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    return {
        "python": sys.version.split()[0],
        "bitbench": version("bitbench"), "torch": version("torch"), "torchvision": version("torchvision"),
        "ray": version("ray"), "numpy": version("numpy"),
        "platform": platform.platform(), "machine": f"{cpu or platform.machine()}, {os.cpu_count()} CPUs",
        "devices": sorted({t["device"] for t in trials if t.get("device")}),
    }


def build_report(s: Session, run_id: int, out_dir: str | Path, *, png: bool = True) -> dict[str, Path] | None:
    """Write run ``run_id``'s report into ``out_dir``; None for an unknown run."""
    run = store.get_run(s, run_id)
    if run is None:
        return None
    trials = store.run_results(s, run_id)
    return write_report(out_dir, run=run, leaderboard=store.leaderboard(s, run_id=run_id), trials=trials,
                        selected_leaderboard=store.leaderboard(s, run_id=run_id, metric="selected"),
                        epoch_rows=store.export_rows(s, run_id), environment=environment(trials), png=png)


def zip_folder(folder: str | Path, prefix: str) -> bytes:
    """The folder's files as a zip archive under ``prefix/``."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for path in sorted(Path(folder).iterdir()):
            z.write(path, f"{prefix}/{path.name}")
    return buf.getvalue()
