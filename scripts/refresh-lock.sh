#!/usr/bin/env bash
# Move the test environment to the newest versions: run the suite against them (scripts/test-latest.sh)
# and, only if it passes, rewrite scripts/constraints.txt from that environment. Review the diff
# (git diff scripts/constraints.txt) and commit it with the fixes the new versions needed.
# Takes no arguments: the lock is written only after a full, green run of the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SEQMIXERS_LATEST_VENV:-.venv-latest}
export SEQMIXERS_LATEST_VENV=$VENV
[[ $# -eq 0 ]] || { echo "refresh-lock: takes no arguments (the whole suite must pass), got: $*" >&2; exit 2; }
bash scripts/test-latest.sh -q
"$VENV/bin/python" scripts/lock.py write scripts/constraints.txt
git --no-pager diff --stat -- scripts/constraints.txt 2>/dev/null || true
