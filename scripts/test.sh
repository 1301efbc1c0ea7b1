#!/usr/bin/env bash
# Set up and run the whole test suite (what .ci/run calls). HYPOTHESIS_PROFILE=dev for thorough runs.
#
# The test dependencies are installed at the versions in scripts/constraints.txt, the versions the suite is
# known to pass with, so a fresh machine gets the same hypothesis, pytest, ... as the last green run;
# pyproject.toml keeps the ranges users install with. SEQMIXERS_CONSTRAINTS=FILE uses another lock file,
# SEQMIXERS_CONSTRAINTS= (empty) none. scripts/test-latest.sh runs the suite against the newest versions.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export SEQMIXERS_CONSTRAINTS=${SEQMIXERS_CONSTRAINTS-scripts/constraints.txt}
bash scripts/setup.sh
# The official RetNet code and flash-linear-attention, for the agreement and converter tests (their own deps
# are not needed: torch stays as set up; fla's modules import triton, which runs nothing without a GPU).
"$PY" -m pip install --quiet --no-deps "torchscale==0.3.0" "fla-core==0.6.0" "flash-linear-attention==0.6.0" \
  "triton==3.9.0"
# The two example plugins (registered through entry points, so they must be installed); --no-deps: they
# need only seqmixers, installed above. Their tests are in pytest's testpaths (pyproject.toml).
"$PY" -m pip install --quiet --no-deps -e plugins/seqmixers-fla -e plugins/seqmixers-conv
"$PY" scripts/lock.py show  # the versions this run tests with, for the log
exec "$PY" -m pytest "$@"
