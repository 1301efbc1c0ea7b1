#!/usr/bin/env bash
# Run the whole test suite against the NEWEST versions of every dependency, in a new virtualenv, so that
# drift (a new hypothesis, pytest, ...) is seen on purpose rather than by a failing CI. The locked run is
# scripts/test.sh; this one ignores scripts/constraints.txt. Arguments go to pytest.
#
#   SEQMIXERS_LATEST_VENV=DIR  where to build the virtualenv (default .venv-latest, rebuilt every run)
#   TORCH_SPEC=SPEC            the torch to install in it (default: the version the current python has,
#                              else torch==2.13.0); torch is never upgraded by this script
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${SEQMIXERS_LATEST_VENV:-.venv-latest}
if [[ -z "${TORCH_SPEC:-}" ]]; then
  TORCH_SPEC=$("$PY" -c 'import importlib.metadata as m; print("torch==" + m.version("torch"))' 2>/dev/null \
    || echo "torch==2.13.0")
fi
rm -rf "$VENV"
"$PY" -m venv "$VENV"
echo "test-latest: new virtualenv $VENV, $TORCH_SPEC, every other dependency at its newest version"
status=0  # scripts/setup.sh (through test.sh) installs TORCH_SPEC into the new, empty virtualenv
TORCH_SPEC="$TORCH_SPEC" SEQMIXERS_CONSTRAINTS= SEQMIXERS_UPGRADE=1 PYTHON="$VENV/bin/python" \
  bash scripts/test.sh "$@" || status=$?
if "$VENV/bin/python" scripts/lock.py check scripts/constraints.txt > "$VENV/drift.txt"; then
  echo "test-latest: the newest versions are the locked ones (scripts/constraints.txt)"
else
  echo "test-latest: newer than the lock (scripts/constraints.txt):"
  sed 's/^/  /' "$VENV/drift.txt"
fi
if [[ $status -eq 0 ]]; then
  echo "test-latest: PASSED with the newest versions; 'bash scripts/refresh-lock.sh' would lock them"
else
  echo "test-latest: FAILED (pytest exit $status) with the newest versions; the locked run is unaffected" >&2
fi
exit $status
