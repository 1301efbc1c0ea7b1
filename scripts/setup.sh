#!/usr/bin/env bash
# Set up seqmixers on a fresh machine: torch first (keeping any torch already installed, such as a
# user's CUDA build), then the project in editable mode with its dev extras.
#
#   SEQMIXERS_CONSTRAINTS=FILE  install the project's dependencies at the versions FILE pins (scripts/test.sh
#                               passes scripts/constraints.txt, the versions the suite is known to pass with)
#   SEQMIXERS_UPGRADE=1         upgrade every dependency to its newest version (scripts/test-latest.sh)
#   TORCH_SPEC=SPEC             what to install when torch is missing (default torch==2.13.0)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if "$PY" -c "import torch" 2>/dev/null; then
  echo "setup: keeping installed torch $("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null)"
else
  # A bare 'torch' requirement would pull the newest build with gigabytes of CUDA wheels; this pin
  # gets the CPU wheel on machines that carry it. Override with TORCH_SPEC (e.g. TORCH_SPEC=torch).
  "$PY" -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
fi
# Pin torch to the installed build, so that no resolution (an upgrade included) replaces a user's CUDA torch.
TORCH_PIN=$(mktemp)
trap 'rm -f "$TORCH_PIN"' EXIT
"$PY" -c 'import importlib.metadata as m; print("torch==" + m.version("torch"))' > "$TORCH_PIN"
PIP_ARGS=(--constraint "$TORCH_PIN")
if [[ -n "${SEQMIXERS_CONSTRAINTS:-}" ]]; then
  [[ -f "$SEQMIXERS_CONSTRAINTS" ]] || { echo "setup: no constraints file $SEQMIXERS_CONSTRAINTS" >&2; exit 2; }
  PIP_ARGS+=(--constraint "$SEQMIXERS_CONSTRAINTS")
fi
if [[ "${SEQMIXERS_UPGRADE:-0}" == 1 ]]; then
  PIP_ARGS+=(--upgrade --upgrade-strategy eager)
fi
"$PY" -m pip install --quiet "${PIP_ARGS[@]}" -e ".[dev]"
echo "setup: done ($("$PY" -c 'import mixers, torch; print("seqmixers", mixers.__version__, "torch", torch.__version__)'))"
