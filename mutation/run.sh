#!/usr/bin/env bash
# Mutation testing with cosmic-ray, one module group at a time (mutation/<name>.toml), one worker, niced.
# Usage: mutation/run.sh [name ...]   (default: every mutation/*.toml)
# cosmic-ray edits the source files in place while a mutant is tested and restores them after:
# run it on a clean tree and do not edit the mutated modules meanwhile. Sessions resume where they stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH" PYTHONPATH="$PWD"
mkdir -p mutation/sessions
names=("$@")
[ ${#names[@]} -gt 0 ] || names=($(ls mutation/*.toml | xargs -n1 basename | sed 's/\.toml$//'))
for name in "${names[@]}"; do
    cfg=mutation/$name.toml db=mutation/sessions/$name.sqlite
    if [ ! -f "$db" ]; then  # a new session: built under a temporary name, so a stopped init starts over
        nice -n 15 cosmic-ray baseline "$cfg"  # the unmutated tree must pass its subset
        cosmic-ray init "$cfg" "$db.new"
        cr-filter-operators "$db.new" "$cfg"
        python mutation/thin.py "$db.new"
        mv "$db.new" "$db"
    fi
    echo "== $name: $(date -u +%FT%TZ)"
    nice -n 15 cosmic-ray exec "$cfg" "$db"
done
git diff --quiet -- estimators workers service dashboard || { echo "source left mutated: git diff" >&2; exit 1; }
python mutation/report.py "${names[@]}"
