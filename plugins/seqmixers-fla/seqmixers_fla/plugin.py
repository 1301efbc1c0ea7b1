"""The plugin module named by the ``seqmixers`` entry point: registers backend ``"fla"`` for three ops.

The backend is registered whether or not fla and a GPU are present; ``check_available`` says which is
missing, so ``python -m mixers list`` and any error naming the backend explain why it cannot run.
"""

from __future__ import annotations

import importlib.util

import torch
from mixers import Backend, hookimpl
from mixers.catalogue import BackendRegistrar

from seqmixers_fla.adapter import _kernels, gated_retention, linear_attention, retention

# Below the torch backend (0) until the GPU tests have passed on a GPU: "auto" never picks unverified
# kernels, as in the core's CuPy backend. Raise it once tests/test_seqmixers_fla.py passes on a GPU.
PRIORITY = -5
DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16})  # fla's kernels take no float64


def check_available() -> str | None:
    """``None`` when fla's kernels import and torch sees a CUDA device, else everything that is missing."""
    missing = []
    if importlib.util.find_spec("fla") is None:
        missing.append("flash-linear-attention is not installed (pip install 'seqmixers-fla[gpu]')")
    if not torch.cuda.is_available():
        missing.append("no CUDA device (torch.cuda.is_available() is False); fla's Triton kernels need a GPU")
    if missing:
        return "; ".join(missing)
    try:
        _kernels()
    except Exception as exc:  # a Triton or fla version that does not fit
        return f"fla's simple_gla kernels failed to import: {type(exc).__name__}: {exc}"
    return None


@hookimpl
def register_backends(register: BackendRegistrar) -> None:
    for op, fn in (
        ("retention", retention),
        ("gated_retention", gated_retention),
        ("linear_attention", linear_attention),
    ):
        register(
            Backend(
                op=op,
                name="fla",
                fn=fn,
                priority=PRIORITY,
                devices=frozenset({"cuda"}),
                dtypes=DTYPES,
                check_available=check_available,
                description="flash-linear-attention's Triton kernels (simple_gla); not yet verified on a GPU",
            )
        )
