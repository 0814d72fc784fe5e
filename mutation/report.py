"""Counts and surviving mutants of the cosmic-ray sessions in mutation/sessions/, as Markdown.

Usage: python mutation/report.py [name ...]   (default: every session). Killed counts a failing test run;
"timeout" is a kill by the session's timeout; the score is killed / (killed + survived), before any
survivor is judged equivalent (docs/mutation.md does that by hand).
"""
import sys
from collections import Counter
from pathlib import Path

from cosmic_ray.work_db import WorkDB, use_db

SESSIONS = Path(__file__).parent / "sessions"


def outcome(result) -> str:
    if result is None:
        return "pending"
    if result.worker_outcome.value == "skipped":
        return "skipped"
    if result.test_outcome is None:
        return result.worker_outcome.value
    if result.test_outcome.value == "killed":
        return "timeout" if result.output == "timeout" else "killed"
    return result.test_outcome.value  # survived, incompetent


def source_line(path: str, line: int) -> str:
    try:
        return Path(path).read_text().splitlines()[line - 1].strip()
    except (OSError, IndexError):
        return "?"


def report(name: str) -> tuple[Counter, list[str]]:
    counts: Counter = Counter()
    survivors = []
    with use_db(str(SESSIONS / f"{name}.sqlite"), WorkDB.Mode.open) as db:
        for item, result in db.completed_work_items:
            kind = outcome(result)
            counts[kind] += 1
            if kind == "survived":
                m = item.mutations[0]
                line = m.start_pos[0]
                survivors.append(f"| `{m.module_path}:{line}` | {m.operator_name.removeprefix('core/')} "
                                 f"#{m.occurrence} | `{source_line(str(m.module_path), line)}` |")
        counts["pending"] += sum(1 for _ in db.pending_work_items)
    return counts, sorted(survivors)


def main(names: list[str]) -> None:
    names = names or sorted(p.stem for p in SESSIONS.glob("*.sqlite"))
    cols = ("killed", "timeout", "survived", "incompetent", "pending", "skipped")
    print("| session | " + " | ".join(cols) + " | score |")
    print("|---" * (len(cols) + 2) + "|")
    all_survivors = []
    for name in names:
        counts, survivors = report(name)
        dead = counts["killed"] + counts["timeout"]
        score = f"{100 * dead / (dead + counts['survived']):.1f} %" if dead + counts["survived"] else "—"
        print(f"| {name} | " + " | ".join(str(counts[c]) for c in cols) + f" | {score} |")
        all_survivors += survivors
    print("\n| surviving mutant | operator | line |\n|---|---|---|")
    print("\n".join(all_survivors))


if __name__ == "__main__":
    main(sys.argv[1:])
