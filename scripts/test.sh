#!/usr/bin/env bash
# Set up and run the whole test suite (what .ci/run calls). HYPOTHESIS_PROFILE=dev for thorough runs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/setup.sh
# The official RetNet code, for the side-by-side agreement test (its own deps are not needed).
"$PY" -m pip install --quiet --no-deps "torchscale==0.3.0"
# The two example plugins (registered through entry points, so they must be installed); --no-deps: they
# need only seqmixers, installed above. Their tests are in pytest's testpaths (pyproject.toml).
"$PY" -m pip install --quiet --no-deps -e plugins/seqmixers-fla -e plugins/seqmixers-conv
exec "$PY" -m pytest "$@"
