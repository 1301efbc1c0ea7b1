#!/usr/bin/env bash
# Set up seqmixers on a fresh machine: torch first (keeping any torch already installed, such as a
# user's CUDA build), then the project in editable mode with its dev extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if "$PY" -c "import torch" 2>/dev/null; then
  echo "setup: keeping installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
else
  # A bare 'torch' requirement would pull the newest build with gigabytes of CUDA wheels; this pin
  # gets the CPU wheel on machines that carry it. Override with TORCH_SPEC (e.g. TORCH_SPEC=torch).
  "$PY" -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
fi
"$PY" -m pip install --quiet -e ".[dev]"
echo "setup: done ($("$PY" -c 'import mixers, torch; print("seqmixers", mixers.__version__, "torch", torch.__version__)'))"
