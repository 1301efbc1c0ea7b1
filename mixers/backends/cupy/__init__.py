"""The ``cupy`` backend: retention through hand-written CUDA kernels (the ``.cu`` files here), compiled at
run time by CuPy's NVRTC and run on torch's current stream.

Status: the kernels compile for sm_80 and sm_90 and compute the float64 reference's results when the
tests run their source on the CPU emulator (``tests/cuda_emu``), but they have not yet run on a GPU.
Until they have, this backend ranks below the torch backend (priority -10), so ``backend="auto"``
never picks it; ask for it by name, ``backend="cupy"``. See ``docs/backends/cupy.md``.

This module imports without CuPy: CuPy is imported only to check availability and to compile.
"""

from __future__ import annotations

import warnings

import torch

from mixers.backends.cupy._retention import retention
from mixers.catalogue import Backend, BackendRegistrar
from mixers.hookspecs import hookimpl

PRIORITY = -10  # below the torch backend (0) until the kernels have passed on a GPU


def check_available() -> str | None:
    """``None`` when CuPy imports and sees a CUDA device, else why not."""
    try:
        with warnings.catch_warnings():  # a CuPy import-time warning must not count as a failure
            warnings.simplefilter("default")
            import cupy
    except ImportError:
        return "CuPy is not installed (pip install seqmixers[cuda], or seqmixers[cuda13] for CUDA 13)"
    except Exception as exc:  # a broken CUDA installation, say
        return f"CuPy failed to import: {type(exc).__name__}: {exc}"
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return f"CuPy cannot reach a CUDA device: {type(exc).__name__}: {exc}"
    return None if count > 0 else "no CUDA device (CuPy sees none)"


@hookimpl
def register_backends(register: BackendRegistrar) -> None:
    register(
        Backend(
            op="retention",
            name="cupy",
            fn=retention,
            priority=PRIORITY,
            devices=frozenset({"cuda"}),
            dtypes=frozenset({torch.float32, torch.float16, torch.bfloat16}),
            check_available=check_available,
            description="hand-written CUDA kernels compiled by CuPy; not yet verified on a GPU, so ranks below torch",
            traceable=False,  # dynamo cannot trace CuPy launches: torch.compile sees an opaque custom op instead
        )
    )
