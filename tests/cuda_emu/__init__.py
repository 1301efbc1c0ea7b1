"""The CUDA kernels of ``mixers/backends/cupy`` run on the CPU (see ``emu.h``), behind the same ``Runtime``
interface as CuPy, so that ``mixers.backends.cupy._retention`` drives them unchanged on CPU tensors."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
KERNELS = HERE.parent.parent / "mixers" / "backends" / "cupy"
# No -Werror: which warnings a host compiler gives varies by compiler and version, and this build is
# test scaffolding; the kernels' own warnings gate is nvcc's (tests/test_cupy_compile.py).
CXX_FLAGS = ("-std=c++17", "-O2", "-fPIC", "-shared", "-fno-strict-aliasing", "-Wall", "-Wextra",
             "-Wno-unknown-pragmas")  # fmt: skip


def compiler() -> str | None:
    """The host C++ compiler (g++ or clang++ on PATH), or ``None``."""
    return shutil.which("g++") or shutil.which("clang++")


def build() -> ctypes.CDLL:
    """Compile the emulated kernels once per source version (cached in the temp directory) and load them."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++ or clang++) on PATH")
    sources = sorted([*HERE.glob("*.h"), *HERE.glob("*.cpp"), *KERNELS.glob("*.cu"), *KERNELS.glob("*.cuh")])
    digest = hashlib.sha256()
    for path in sources:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    digest.update(" ".join((cxx, *CXX_FLAGS)).encode())
    lib = Path(tempfile.gettempdir()) / f"seqmixers-cuda-emu-{digest.hexdigest()[:16]}.so"
    if not lib.exists():
        tmp = lib.with_suffix(f".{os.getpid()}.tmp")  # then renamed: concurrent builds never see half a file
        cmd = [cxx, *CXX_FLAGS, f"-I{HERE}", f"-I{KERNELS}", "-o", str(tmp), str(HERE / "harness.cpp")]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr}")
        tmp.replace(lib)
    return ctypes.CDLL(str(lib))


class EmuRuntime:
    """A ``mixers.backends.cupy._runtime.Runtime`` whose launches run on the CPU emulator.

    ``schedule`` picks which emulated thread runs next at a barrier (emu.h: 0 round robin, 1 and 2
    greedy from the lowest or highest thread, others greedy in a random order seeded by it); the device
    limits (shared memory, multiprocessors, tensor cores) are those of the GPU to imitate.
    """

    def __init__(
        self, lib: ctypes.CDLL, *, schedule: int = 0, max_smem: int = 227 * 1024, num_sms: int = 132,
        tensor_cores: bool = True,
    ) -> None:  # fmt: skip
        self.lib = lib
        self.schedule = schedule
        self.max_smem = max_smem
        self.num_sms = num_sms
        self.tensor_cores = tensor_cores
        self.launches: list[tuple[str, int, tuple[int, int], int]] = []  # (kernel, grid, block, smem)
        lib.emu_last_error.restype = ctypes.c_char_p

    def launch(
        self, module: str, kernel: str, grid: int, block: tuple[int, int], smem: int, args: Sequence[int | float]
    ) -> None:
        if smem > self.max_smem:
            raise RuntimeError(f"{kernel}: {smem} bytes of shared memory exceed the device's {self.max_smem}")
        self.launches.append((kernel, grid, block, smem))
        self.lib.emu_configure(
            ctypes.c_longlong(grid), ctypes.c_longlong(1), ctypes.c_longlong(1), ctypes.c_longlong(block[0]),
            ctypes.c_longlong(block[1]), ctypes.c_longlong(1), ctypes.c_longlong(smem),
            ctypes.c_longlong(self.schedule),
        )  # fmt: skip
        fn = getattr(self.lib, kernel)
        fn.restype = ctypes.c_int
        cargs = [ctypes.c_double(a) if isinstance(a, float) else ctypes.c_longlong(a) for a in args]
        if fn(*cargs) != 0:
            raise RuntimeError(f"{kernel} failed in the emulator: {self.lib.emu_last_error().decode()}")


@contextlib.contextmanager
def emulated_backend(rt: EmuRuntime) -> Iterator[None]:
    """Within: the registered ``cupy`` backend is available and takes CPU tensors, running its kernels on
    ``rt``; so anything that asks for ``backend="cupy"`` (the conformance kit, a mixer) runs the emulated
    kernels through the backend's full code path. The registry is loaded afresh on entry and dropped on
    exit, so that none of its caches (availability, resolved backends) outlives the emulation."""
    from mixers import registry as reg
    from mixers.backends.cupy import _retention

    reg.reset_registry()
    registry = reg.get_registry()
    backend = registry.backends["retention"]["cupy"]
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(_retention, "cupy_runtime", lambda device: rt)
            emulated = dataclasses.replace(backend, devices=None, check_available=None)
            with registry.temporary_backend(emulated, override=True):
                yield
    finally:
        reg.reset_registry()
