"""The report generator on a small finished run stored in a real database."""
import json
import math
import re
import shutil
import subprocess

import pytest

from dashboard.stats import detectable_difference
from service import store
from service.report import build_report
from service.sink import SqlSink
from workers.spec import parse_spec

SPEC = {"name": "report <test>", "dataset": "digits", "model": "digits_net",
        "estimators": ["aqe", "ste", "clipped_ste"], "bits": [{"w": 1, "a": 1}, {"w": 2, "a": 2}],
        "seeds": [0, 1, 2], "epochs": 2}
# final test accuracy per (label, bits, seed): AQE ahead of STE by exactly 2 points at W1A1
ACC = {("aqe", 1): [0.80, 0.82, 0.84], ("ste", 1): [0.78, 0.80, 0.82], ("clipped_ste", 1): [0.79, 0.80, 0.85],
       ("aqe", 2): [0.90, 0.91, 0.89], ("ste", 2): [0.88, 0.90, 0.90], ("clipped_ste", 2): [0.90, 0.90, 0.90],
       ("float", 32): [0.95, 0.96, 0.97]}


@pytest.fixture
def finished_run(sessions, db_url):
    return store_run(sessions, db_url, ACC)


def store_run(sessions, db_url, accuracies):
    """SPEC's run with every trial done at ``accuracies[(label, bits)][seed]``, through the SQL sink."""
    with sessions() as s:
        run, _ = store.create_run(s, parse_spec(SPEC))
    sink = SqlSink.from_url(db_url, run["id"]) if hasattr(SqlSink, "from_url") else SqlSink(sessions, run["id"])
    with sessions() as s:
        keys = [t["key"] for t in store.list_trials(s, run["id"])]
    for key in keys:
        label, bits, seed = key.split("-w")[0], int(key.split("-w")[1].split("a")[0]), int(key.rsplit("-s", 1)[1])
        acc = accuracies[(label, bits)][seed]
        sink.on_trial_start(key, {"device": "cpu", "attempt": 1})
        for epoch in (1, 2):
            sink.on_epoch(key, {"epoch": epoch, "train_loss": 1.0 / epoch, "train_acc": acc - 0.1 / epoch,
                                "val_acc": acc, "test_acc": acc if epoch == 2 else acc - 0.05, "lr": 0.01,
                                "epoch_seconds": 1.0, "images_per_s": 100.0, "device": "cpu",
                                "schedule": {"aqe.alpha": 0.5 * 2 ** (epoch / 2)} if label == "aqe" else {}})
        sink.on_trial_end(key, "done", {"final_test_acc": acc, "final_val_acc": acc, "best_val_acc": acc,
                                        "best_epoch": 2, "epochs": 2}, None)
    return run["id"]


def test_report_rows_come_from_the_database(sessions, finished_run, tmp_path):
    with sessions() as s:
        files = build_report(s, finished_run, tmp_path / "report", png=False)
    md = files["RESULTS.md"].read_text()
    # spot-check by hand: aqe at W1A1 = mean(80, 82, 84) = 82.00, std = 2.00, n = 3
    assert re.search(r"\| 1 \| `aqe` \*\*\(best\)\*\* \| minw \| 82\.00 ± 2\.00 \| 3 \|", md), md
    assert "| `clipped_ste` | minw | 81.33 ± 3.21 | 3 |" in md
    # paired: aqe − ste at W1A1 is exactly +2.00 points on every seed → zero spread, significant
    assert "| `aqe` | `ste` | W1A1 | 0,1,2 | +2.00 |" in md
    assert "Full-precision reference: 96.00 ± 1.00 % (n = 3)." in md
    assert "report <test>" in md
    assert json.loads(files["spec.json"].read_text())["estimators"][0]["name"] == "aqe"
    env = json.loads(files["environment.json"].read_text())
    assert env["torch"].startswith("2.14.1") and env["devices"] == ["cpu"]
    html = files["accuracy_vs_bits.html"].read_text()
    assert 'src="plotly.min.js"' in html and len(html) < 100_000  # plotly.js once in the folder, no CDN
    assert "cdn" not in html.lower() and files["plotly.min.js"].stat().st_size > 1_000_000
    assert "plotly.js v" in files["plotly.min.js"].read_text()[:500]


def test_paired_comparisons_are_judged_as_a_family(sessions, db_url, tmp_path):
    """Holm over the report's four final-accuracy tests: aqe − ste at W1A1 is (2, 3, 4) points, p ≈ 0.035
    alone and 4p ≈ 0.140 in the family, so not significant; its effect size and detectable difference."""
    run_id = store_run(sessions, db_url, {**ACC, ("ste", 1): [0.78, 0.79, 0.80]})
    with sessions() as s:
        md = build_report(s, run_id, tmp_path / "report", png=False)["RESULTS.md"].read_text()
    assert "| p | p (Holm) | significant (Holm p < 0.05) | d_z | detectable Δ (points) | accuracy |" in md
    assert "one family of tests (final: 4 tests)" in md and "Cohen's d_z" in md
    assert "**Fewer than 5 seeds:** some comparisons below pair only 3 seeds" in md  # a pilot, and it says so
    # t = 3√3 on 2 degrees of freedom: p = 1 − t/√(t² + 2); the other three p-values are 0.529, 0.529 and 1
    p = 1 - 3 * math.sqrt(3) / math.sqrt(29)
    detectable = 100 * detectable_difference(3, 0.01)  # sd of (2, 3, 4) points = 1 point
    assert f"| `aqe` | `ste` | W1A1 | 0,1,2 | +3.00 | [+0.52, +5.48] | {p:.3f} | {4 * p:.3f} | no | +3.00 " \
           f"| {detectable:.2f} | final |" in md, md
    assert "| `aqe` | `clipped_ste` | W2A2 | 0,1,2 | +0.00 | [-2.48, +2.48] | 1.000 | 1.000 | no |" in md


def test_latex_table_is_a_well_formed_tabular(sessions, finished_run, tmp_path):
    with sessions() as s:
        files = build_report(s, finished_run, tmp_path / "r", png=False)
    tex = files["leaderboard.tex"].read_text()
    body = [line for line in tex.splitlines() if line.endswith(r"\\")]
    assert tex.startswith(r"\begin{tabular}{llrrr}") and tex.rstrip().endswith(r"\end{tabular}")
    assert all(line.count("&") == 4 for line in body) and len(body) == 1 + 4  # header + aqe, clipped_ste, float, ste
    assert r"clipped\_ste" in tex and r"\textbf{82.00 $\pm$ 2.00}" in tex
    if shutil.which("pdflatex"):
        doc = tmp_path / "t.tex"
        doc.write_text("\\documentclass{article}\\begin{document}\n" + tex + "\\end{document}\n")
        subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", doc.name], cwd=tmp_path,
                       check=True, capture_output=True, timeout=120)


@pytest.mark.slow
def test_png_figures_are_written_with_kaleido(sessions, finished_run, tmp_path):
    if not shutil.which("chromium"):
        pytest.skip("Debian's chromium is needed by kaleido")
    with sessions() as s:
        files = build_report(s, finished_run, tmp_path / "png")
    for name in ("accuracy_vs_bits.png", "training_curves.png"):
        data = files[name].read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert "![accuracy_vs_bits](accuracy_vs_bits.png)" in files["RESULTS.md"].read_text()
