"""cosmic-ray filter: keep one of NumberReplacer's two mutants per number (n + 1; skip n − 1).

Usage: python mutation/thin.py SESSION.sqlite. NumberReplacer numbers its occurrences two per literal
(+1 then −1), so the odd occurrences are the −1 twins.
"""
import sys

from cosmic_ray.work_db import WorkDB, use_db
from cosmic_ray.work_item import WorkerOutcome, WorkResult


def main(session: str) -> int:
    skipped = 0
    with use_db(session, WorkDB.Mode.open) as db:
        for item in list(db.pending_work_items):
            m = item.mutations[0]
            if m.operator_name == "core/NumberReplacer" and m.occurrence % 2 == 1:
                db.set_result(item.job_id, WorkResult(output="n - 1 twin of an n + 1 mutant",
                                                      worker_outcome=WorkerOutcome.SKIPPED))
                skipped += 1
    print(f"thin: skipped {skipped} NumberReplacer n - 1 twins")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
