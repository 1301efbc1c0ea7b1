#!/usr/bin/env bash
# Set up and run the whole test suite (what .ci/run calls). HYPOTHESIS_PROFILE=dev for thorough runs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/setup.sh
# The official RetNet code, for the side-by-side agreement test (its own deps are not needed).
"$PY" -m pip install --quiet --no-deps "torchscale==0.3.0"
exec "$PY" -m pytest "$@"
