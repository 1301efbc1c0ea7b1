"""The cupy backend's CUDA sources compile, on every machine (no GPU needed), so CI checks them too.

- ``nvcc`` compiles each ``.cu`` file for sm_80 and sm_90 with every warning an error. Templates are
  instantiated through their ``extern "C"`` entry points, so every code path is compiled; the test also
  checks that each entry point really reached ``ptxas``.
- Every kernel the launch code can ask for is defined in the sources (names are built from dtype, kind,
  value tile and row count, so a typo would otherwise surface only on a GPU).
- NVRTC, the compiler CuPy uses at run time, compiles the exact text CuPy is given (headers inlined),
  when a libnvrtc is found (``SEQMIXERS_NVRTC=/path/to/libnvrtc.so``, the CUDA toolkit next to ``nvcc``,
  or the ``nvidia-cuda-nvrtc`` wheel); otherwise that test skips and says so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import shutil
import subprocess
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from mixers.backends.cupy import _retention
from mixers.backends.cupy._runtime import SOURCE_DIR, load_source

CU_FILES = sorted(p.name for p in SOURCE_DIR.glob("*.cu"))
ARCHS = ("sm_80", "sm_90")
ENTRY = re.compile(r"^SM_ENTRY\((\w+),", re.MULTILINE)


def entry_points(name: str) -> list[str]:
    return ENTRY.findall((SOURCE_DIR / name).read_text())


def test_sources_are_found():
    assert CU_FILES == ["retention_chunk_mma.cu", "retention_chunk_simt.cu", "retention_recurrent.cu"]
    assert all(entry_points(name) for name in CU_FILES)


@pytest.fixture(scope="module")
def nvcc_jobs(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Future]:
    """Start every (file, arch) compile at once, on as many threads as there are cores."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH: the CUDA sources cannot be compiled here")
    out = tmp_path_factory.mktemp("cubin")

    def compile_one(name: str, arch: str) -> tuple[list[str], subprocess.CompletedProcess]:
        cmd = [nvcc, "-std=c++17", f"-arch={arch}", "-cubin", "-Werror", "all-warnings", "-Xptxas", "-v",
               f"-I{SOURCE_DIR}", "-o", str(out / f"{name}.{arch}.cubin"), str(SOURCE_DIR / name)]  # fmt: skip
        return cmd, subprocess.run(cmd, capture_output=True, text=True, timeout=600)

    pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 2)
    jobs = {(name, arch): pool.submit(compile_one, name, arch) for name in CU_FILES for arch in ARCHS}
    pool.shutdown(wait=False)
    return jobs


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", CU_FILES)
def test_nvcc_compiles_without_warnings(nvcc_jobs, name, arch):
    cmd, result = nvcc_jobs[(name, arch)].result()
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stderr}"
    compiled = set(re.findall(r"Compiling entry function '(\w+)'", result.stderr))
    missing = set(entry_points(name)) - compiled
    assert not missing, f"{name} ({arch}): entry points never compiled: {sorted(missing)}\n{result.stderr}"


def launchable_kernels() -> set[str]:
    """Every kernel name ``_retention`` can build (see chunk_retention and recurrent_retention)."""
    names = set()
    for dtype, dt in _retention._DTYPE_NAMES.items():
        for bv in (32, 64):
            names.add(f"retention_chunk_simt_{dt}_bv{bv}")
            if dtype == torch.bfloat16:
                names.add(f"retention_chunk_mma_{dt}_bv{bv}")
        for rows in (16, 32):
            names.add(f"retention_recurrent_{dt}_r{rows}")
    return names


def test_every_launchable_kernel_is_defined():
    defined = {kernel for name in CU_FILES for kernel in entry_points(name)}
    assert launchable_kernels() == defined


def find_nvrtc() -> Path | None:
    """A libnvrtc: $SEQMIXERS_NVRTC, the toolkit next to nvcc, the nvidia-cuda-nvrtc wheel, or the loader's."""
    if os.environ.get("SEQMIXERS_NVRTC"):
        return Path(os.environ["SEQMIXERS_NVRTC"])
    places = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        root = Path(nvcc).resolve().parent.parent
        places += [root / "lib64", root / "lib", root / "targets" / "x86_64-linux" / "lib"]
    try:
        import nvidia  # the namespace package of NVIDIA's wheels

        places += [Path(p) / sub / "lib" for p in nvidia.__path__ for sub in ("cu13", "cuda_nvrtc")]
    except ImportError:
        pass
    for place in places:
        found = sorted(place.glob("libnvrtc.so*")) if place.is_dir() else []
        if found:
            return found[0]
    name = ctypes.util.find_library("nvrtc")
    return Path(name) if name else None


def nvrtc_compile(lib: ctypes.CDLL, name: str, arch: str) -> tuple[int, str]:
    """Compile ``name`` as CuPy's RawModule would (inlined headers, -std=c++17); (status, log)."""
    prog = ctypes.c_void_p()
    status = lib.nvrtcCreateProgram(ctypes.byref(prog), load_source(name).encode(), name.encode(), 0, None, None)
    assert status == 0, f"nvrtcCreateProgram: {status}"
    try:
        options = [b"-std=c++17", f"-arch={arch}".encode()]
        status = lib.nvrtcCompileProgram(prog, len(options), (ctypes.c_char_p * len(options))(*options))
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        return status, log.value.decode(errors="replace").strip()
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


@pytest.mark.parametrize("name", CU_FILES)
def test_nvrtc_compiles_what_cupy_is_given(name):
    path = find_nvrtc()
    if path is None:
        pytest.skip("no libnvrtc found (set SEQMIXERS_NVRTC, or install nvidia-cuda-nvrtc)")
    for builtins in sorted(path.parent.glob("libnvrtc-builtins.so*")):  # so that libnvrtc finds it by name
        ctypes.CDLL(str(builtins), mode=ctypes.RTLD_GLOBAL)
    lib = ctypes.CDLL(str(path))
    status, log = nvrtc_compile(lib, name, "sm_80")  # the arch-specific paths are nvcc's test above
    assert status == 0 and not log, f"NVRTC ({path}) on {name}: status {status}\n{log}"
