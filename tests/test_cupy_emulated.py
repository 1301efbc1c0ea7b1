"""The cupy backend's kernels, run from their own CUDA source on the CPU, through the backend's own
launch code (``mixers.backends.cupy._retention`` with the emulator of ``tests/cuda_emu`` as its runtime).

This is how the kernels are checked where there is no GPU (CI): forward and backward against the
float64 reference and against the torch backend on the same inputs, in every dtype, for the tensor-core
and the CUDA-core kernels and the recurrent one; every output element written and none outside it;
inputs read through strides from poisoned buffers; and bit-identical results under thread schedules
that expose a missing barrier. What emulation cannot show (timing, the real tensor cores, NVRTC at run
time, launch limits) is left to ``test_cupy_backend.py`` on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mixers import functional
from mixers.backends.cupy import _retention
from mixers.ops.retention.reference import retention_reference
from mixers.ops.retention.testing import RetentionCase
from mixers.testing import conformance
from mixers.testing.asserts import norm_rel_error
from mixers.testing.strategies import gamma_values, scaled_examples
from tests import cuda_emu
from tests.cupy_checks import LAYOUTS, OUTPUT_RTOL, STATE_RTOL, PoisonedOutputs, close_to_reference, lay_out

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
KINDS = ("simt", "mma", "recurrent")  # the two chunk kernels (tensor cores: bfloat16 only), the token-by-token one
GRAD_RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}  # RMS, relative


@pytest.fixture(scope="module")
def lib():
    if cuda_emu.compiler() is None:
        pytest.skip("no C++ compiler (g++ or clang++) to build the kernels for the CPU")
    return cuda_emu.build()


def runtime(lib, kind: str, schedule: int = 0, num_sms: int = 132, max_smem: int = 227 * 1024):
    """An emulated GPU; ``kind`` "simt" hides the tensor cores so bfloat16 takes the CUDA-core kernel."""
    return cuda_emu.EmuRuntime(lib, schedule=schedule, num_sms=num_sms, max_smem=max_smem,
                               tensor_cores=kind != "simt")  # fmt: skip


def mode_of(kind: str) -> str:
    return "recurrent" if kind == "recurrent" else "chunkwise"


@st.composite
def emulated_cases(draw, max_T: int = 200, max_D: int = 80, budget: int = 400_000):
    """Sizes crossing every tile edge (64 positions, 64 key dims, 32/64 value columns), any decay."""
    dtype = draw(st.sampled_from(DTYPES))
    kind = draw(st.sampled_from(KINDS if dtype == torch.bfloat16 else ("simt", "recurrent")))
    B, H = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    Dk, Dv = draw(st.integers(1, max_D)), draw(st.integers(1, max_D))
    T = draw(st.integers(1, max(1, min(max_T, budget // (B * H * max(Dk, Dv))))))
    case = RetentionCase(
        B=B, T=T, H=H, Dk=Dk, Dv=Dv, gamma=tuple(draw(st.lists(gamma_values, min_size=H, max_size=H))),
        chunk_size=64, with_state=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)), dtype=dtype,
    )  # fmt: skip
    options = {
        "kind": kind,
        "layout": draw(st.sampled_from(LAYOUTS)),
        "schedule": draw(st.sampled_from([0, 1, 2, draw(st.integers(3, 2**20))])),
        "num_sms": draw(st.sampled_from([1, 1000])),  # 1: 64-wide value tiles; 1000: 32-wide
    }
    return case, options


def run_case(lib, monkeypatch, case: RetentionCase, options: dict, requires_grad: bool = False):
    q, k, v, s0 = case.tensors(requires_grad=requires_grad)
    ql, kl, vl = (lay_out(t, options["layout"]) for t in (q, k, v))
    rt = runtime(lib, options["kind"], options["schedule"], options["num_sms"])
    poison = PoisonedOutputs(monkeypatch)
    o, s = _retention.run(rt, ql, kl, vl, case.gamma_tensor, mode=mode_of(options["kind"]), initial_state=s0)
    return (q, k, v, s0), (o, s), poison


@settings(max_examples=scaled_examples(1.0))
@given(drawn=emulated_cases())
def test_forward_matches_reference_and_torch_backend(lib, drawn):
    case, options = drawn
    with pytest.MonkeyPatch.context() as mp:
        (q, k, v, s0), (o, s), poison = run_case(lib, mp, case, options)
        poison.check()
    assert o.dtype == case.dtype and s.dtype == torch.float32
    ref_o, ref_s = retention_reference(q, k, v, case.gamma_tensor, s0)
    abs_o, abs_s = retention_reference(q.abs(), k.abs(), v.abs(), case.gamma_tensor, None if s0 is None else s0.abs())
    base_o, base_s = functional.retention(q, k, v, case.gamma_tensor, mode=mode_of(options["kind"]),
                                          initial_state=s0, backend="torch")  # fmt: skip
    what = f"{options} {case}"
    close_to_reference(o, ref_o, abs_o, OUTPUT_RTOL[case.dtype], f"output {what}", baseline=base_o)
    close_to_reference(s, ref_s, abs_s, STATE_RTOL[case.dtype], f"state {what}", baseline=base_s)


def reference_grads(inputs, gamma, do, ds):
    """Gradients of ``sum(o * do) + sum(S_T * ds)`` through the float64 reference."""
    leaves = [None if t is None else t.detach().double().requires_grad_(True) for t in inputs]
    o, s = retention_reference(*leaves[:3], gamma, leaves[3])
    present = [t for t in leaves if t is not None]
    return torch.autograd.grad((o * do.double()).sum() + (s * ds.double()).sum(), present)


@settings(max_examples=scaled_examples(0.5))
@given(drawn=emulated_cases(max_T=150, max_D=72, budget=150_000))
def test_gradients_match_reference_and_torch_backend(lib, drawn):
    case, options = drawn
    with pytest.MonkeyPatch.context() as mp:
        inputs, (o, s), poison = run_case(lib, mp, case, options, requires_grad=True)
        gen = torch.Generator().manual_seed(case.seed + 1)
        do = torch.randn(o.shape, generator=gen).to(o.dtype)
        ds = torch.randn(s.shape, generator=gen)
        present = [t for t in inputs if t is not None]
        got = torch.autograd.grad((o.float() * do.float()).sum() + (s * ds).sum(), present)
        poison.check()
    want = reference_grads(inputs, case.gamma_tensor, do, ds)
    o_t, s_t = functional.retention(*inputs[:3], case.gamma_tensor, mode=mode_of(options["kind"]),
                                    initial_state=inputs[3], backend="torch")  # fmt: skip
    base = torch.autograd.grad((o_t.float() * do.float()).sum() + (s_t * ds).sum(), present)
    for name, g, w, b in zip("qkvS", got, want, base, strict=False):
        what = f"d{name} {options} {case}"
        assert g.dtype == (torch.float32 if name == "S" else case.dtype) and g.shape == w.shape, what
        assert torch.isfinite(g).all(), what
        err, base_err = norm_rel_error(g, w), norm_rel_error(b, w)
        tol = GRAD_RTOL[torch.float32 if name == "S" else case.dtype]
        assert err <= tol or w.abs().max() < 1e-30, f"{what}: RMS error {err:.3e} > {tol:.1e}"
        assert err <= 1.5 * base_err + 1e-6, f"{what}: RMS error {err:.3e}, torch backend's {base_err:.3e}"


SCHEDULED = [
    pytest.param(kind, dtype, id=f"{kind}-{str(dtype)[6:]}")
    for kind in KINDS
    for dtype in DTYPES
    if kind != "mma" or dtype == torch.bfloat16
]


@pytest.mark.parametrize(("kind", "dtype"), SCHEDULED)
def test_results_are_identical_under_every_schedule(lib, monkeypatch, kind, dtype):
    """Bit for bit, forward and backward: a missing barrier would make some schedule read stale data."""
    case = RetentionCase(B=1, T=150, H=2, Dk=100, Dv=72, gamma=(0.97, 1.0), chunk_size=64, with_state=True,
                         seed=3, dtype=dtype)  # fmt: skip
    results = []
    for schedule in (0, 1, 2, 12345):
        options = {"kind": kind, "layout": "padded", "schedule": schedule, "num_sms": 1}
        inputs, (o, s), poison = run_case(lib, monkeypatch, case, options, requires_grad=True)
        grads = torch.autograd.grad(o.float().sum() + s.sum(), [t for t in inputs if t is not None])
        poison.check()
        results.append([o, s, *grads])
    for schedule, other in zip((1, 2, 12345), results[1:], strict=True):
        for i, (a, b) in enumerate(zip(results[0], other, strict=True)):
            assert torch.equal(a, b), f"schedule {schedule}: result {i} differs from thread order"


@pytest.mark.parametrize(
    ("kind", "dtype", "Dk", "Dv", "T", "expected"),
    [
        ("mma", torch.bfloat16, 512, 40, 70, "retention_chunk_mma_bf16_bv64"),
        ("simt", torch.float32, 512, 40, 70, "retention_chunk_simt_f32_bv64"),
        ("recurrent", torch.float16, 300, 40, 5, "retention_recurrent_f16_r32"),
        ("recurrent", torch.bfloat16, 256, 33, 5, "retention_recurrent_bf16_r16"),
        ("mma", torch.bfloat16, 16, 16, 2048, "retention_chunk_mma_bf16_bv64"),
        ("mma", torch.float16, 40, 24, 200, "retention_chunk_simt_f16_bv64"),  # no tensor cores for float16
    ],
)
def test_large_heads_and_long_sequences(lib, monkeypatch, kind, dtype, Dk, Dv, T, expected):
    """Head sizes up to 512 (8 key tiles, 32 state rows per thread), and 32 chunks."""
    case = RetentionCase(B=1, T=T, H=1, Dk=Dk, Dv=Dv, gamma=(1 - 2**-8,), chunk_size=64, with_state=True, seed=4,
                         dtype=dtype)  # fmt: skip
    rt = runtime(lib, kind, schedule=7, num_sms=1)
    q, k, v, s0 = case.tensors()
    poison = PoisonedOutputs(monkeypatch)
    o, s = _retention.run(rt, q, k, v, case.gamma_tensor, mode=mode_of(kind), initial_state=s0)
    poison.check()
    assert [launch[0] for launch in rt.launches] == [expected]
    ref_o, ref_s = retention_reference(q, k, v, case.gamma_tensor, s0)
    abs_o, abs_s = retention_reference(q.abs(), k.abs(), v.abs(), case.gamma_tensor, s0.abs())
    close_to_reference(o, ref_o, abs_o, OUTPUT_RTOL[dtype], "output")
    close_to_reference(s, ref_s, abs_s, STATE_RTOL[dtype], "state")


@pytest.mark.parametrize("kind", ["simt", "mma"])
def test_reversed_time_with_undecayed_state(lib, kind):
    """The chunk kernels' backward form (chunk.cuh): reverse=1, delta=0 is retention over the flipped
    sequence from the state S_0 / gamma, with the final state multiplied by gamma."""
    dtype = torch.bfloat16 if kind == "mma" else torch.float32
    case = RetentionCase(B=2, T=90, H=2, Dk=24, Dv=40, gamma=(0.9, 0.5), chunk_size=64, with_state=True, seed=5,
                         dtype=dtype)  # fmt: skip
    q, k, v, s0 = case.tensors()
    g = case.gamma_tensor
    o, s = _retention.chunk_retention(runtime(lib, kind), q, k, v, g, s0, reverse=True, delta=0)
    flip = [t.flip(1) for t in (q, k, v)]
    ref_o, ref_s = retention_reference(*flip, g, s0.double() / g[None, :, None, None])
    abs_o, abs_s = retention_reference(*(t.abs() for t in flip), g, s0.double().abs() / g[None, :, None, None])
    close_to_reference(o.flip(1), ref_o, abs_o, OUTPUT_RTOL[dtype], "output")
    close_to_reference(s, ref_s * g[None, :, None, None], abs_s * g[None, :, None, None], STATE_RTOL[dtype], "state")


def test_value_tile_follows_occupancy_and_shared_memory(lib):
    g = torch.tensor([0.9], dtype=torch.float64)
    launched = []
    h100 = 227 * 1024
    for Dk, num_sms, max_smem in [(32, 1, h100), (32, 1000, h100), (32, 1, 60 * 1024), (256, 1, h100)]:
        q = torch.randn(1, 10, 1, Dk, dtype=torch.bfloat16)
        rt = runtime(lib, "mma", num_sms=num_sms, max_smem=max_smem)
        _retention.chunk_retention(rt, q, q, q[..., :32], g, None)
        launched.append(rt.launches[0][0][-4:])
    # 64 wide; 32 to fill more multiprocessors; 32 to fit; 32 so that two blocks share a multiprocessor
    assert launched == ["bv64", "bv32", "bv32", "bv32"]


def test_kernel_refuses_too_little_shared_memory(lib):
    """The kernels check the shared memory they were given against their own layout (a mismatch with the
    launch code's _smem_bytes would otherwise corrupt memory silently)."""
    q = torch.randn(1, 10, 1, 32, dtype=torch.bfloat16)
    rt = runtime(lib, "mma")
    real_launch = rt.launch
    rt.launch = lambda module, kernel, grid, block, smem, args: real_launch(module, kernel, grid, block, smem - 4, args)
    with pytest.raises(RuntimeError, match="shared memory too small"):
        _retention.chunk_retention(rt, q, q, q, torch.tensor([0.9], dtype=torch.float64), None)


@pytest.mark.parametrize("kind", ["simt", "mma"])
def test_conformance_kit_passes(lib, kind):
    """The project's conformance kit, on the backend as registered (validation, dispatch, autograd), its
    kernels emulated: the op checks (reference, hand-over, gradients, bfloat16, bad input) and the
    retention mixer's checks. ("mma": bfloat16 on the tensor cores; "simt": everything on the CUDA cores.)"""
    with cuda_emu.emulated_backend(runtime(lib, kind, schedule=9)):
        conformance.check_op_backend("retention", "cupy", max_examples=8)
        conformance.check_mixer("retention", "cupy", max_examples=4)
