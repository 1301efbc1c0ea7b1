"""Loading the CUDA sources with CuPy and launching them on torch's current stream.

CuPy serves only as the compiler (NVRTC through ``RawModule``, which caches the binaries on disk under
``~/.cupy/kernel_cache``) and the launcher: tensors are passed to the kernels as raw device pointers
(``Tensor.data_ptr()``), so nothing is copied or converted between torch and CuPy.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

SOURCE_DIR = Path(__file__).resolve().parent
_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.MULTILINE)


class Runtime(Protocol):
    """What the launch code needs from a device: its limits, and a way to run a named kernel."""

    max_smem: int  # dynamic shared memory one block may opt in to, in bytes
    num_sms: int
    tensor_cores: bool  # mma.sync m16n8k16 with f16 and bf16 operands (compute capability >= 8.0)

    def launch(
        self, module: str, kernel: str, grid: int, block: tuple[int, int], smem: int, args: Sequence[int | float]
    ) -> None:
        """Run ``kernel`` of ``module`` (a .cu file's stem) on ``grid`` blocks; ints and floats as int64/double."""


def load_source(name: str) -> str:
    """The text of ``name`` with every ``#include "x"`` of a file in this package replaced by that file.

    Inlining (each file once, as ``#pragma once`` would) makes the text CuPy hashes for its kernel cache
    cover the headers too, so an edited header can never be served from a stale cached binary. Includes
    of files that are not here (the emulator's header, inside ``#ifdef``) are left as they are.
    """
    seen: set[str] = set()

    def expand(file: str) -> str:
        if file in seen:
            return ""
        seen.add(file)
        text = (SOURCE_DIR / file).read_text()
        text = text.replace("#pragma once\n", "")
        return _INCLUDE.sub(lambda m: expand(m.group(1)) if (SOURCE_DIR / m.group(1)).is_file() else m.group(0), text)

    return expand(name)


class CupyRuntime:
    """Kernels of one CUDA device, compiled on first use and launched on torch's current stream there."""

    def __init__(self, index: int) -> None:
        import cupy  # only here: the package imports without CuPy

        self._cupy = cupy
        self.index = index
        attrs = cupy.cuda.Device(index).attributes
        self.capability = (attrs["ComputeCapabilityMajor"], attrs["ComputeCapabilityMinor"])
        self.max_smem = int(attrs["MaxSharedMemoryPerBlockOptin"])
        self.num_sms = int(attrs["MultiProcessorCount"])
        self.tensor_cores = self.capability >= (8, 0)
        self._modules: dict[str, Any] = {}
        self._kernels: dict[str, Any] = {}
        self._smem_set: dict[str, int] = {}
        self._streams: dict[int, Any] = {}

    def _kernel(self, module: str, kernel: str, smem: int) -> Any:
        fn = self._kernels.get(kernel)
        if fn is None:
            mod = self._modules.get(module)
            if mod is None:
                mod = self._cupy.RawModule(code=load_source(module + ".cu"), options=("-std=c++17",))
                self._modules[module] = mod
            fn = self._kernels[kernel] = mod.get_function(kernel)
        if smem > self._smem_set.get(kernel, 48 * 1024):  # above 48 KiB a block must opt in
            fn.max_dynamic_shared_size_bytes = smem
            self._smem_set[kernel] = smem
        return fn

    def launch(
        self, module: str, kernel: str, grid: int, block: tuple[int, int], smem: int, args: Sequence[int | float]
    ) -> None:
        ptr = torch.cuda.current_stream(self.index).cuda_stream
        stream = self._streams.get(ptr)
        if stream is None:
            stream = self._streams[ptr] = self._cupy.cuda.ExternalStream(ptr)
        with self._cupy.cuda.Device(self.index):
            self._kernel(module, kernel, smem)((grid,), block, tuple(args), shared_mem=smem, stream=stream)


_RUNTIMES: dict[int, CupyRuntime] = {}


def cupy_runtime(device: torch.device) -> CupyRuntime:
    """The (cached) runtime of a CUDA device."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    rt = _RUNTIMES.get(index)
    if rt is None:
        rt = _RUNTIMES[index] = CupyRuntime(index)
    return rt
