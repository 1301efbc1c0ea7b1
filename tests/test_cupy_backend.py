"""The ``cupy`` backend: its registration everywhere; on a GPU, the kernels themselves.

Everywhere: it is registered for retention on CUDA devices in float32/float16/bfloat16, ranks below the
torch backend (so ``"auto"`` never picks it until its kernels have passed on a GPU), says why it is
unavailable, and its module imports and ``python -m mixers list`` runs without CuPy.

On a GPU (skipped without CuPy and a CUDA device): forward and gradients against float64 and against
the torch backend at the same dtype, for hypothesis-drawn shapes (T 1-2048, H, Dk and Dv up to 256, any
chunk size and mode, each dtype, strided inputs) with per-dtype tolerances; outputs poisoned before
every run; bit-identical repeats; the tensor-core and CUDA-core kernels agreeing; the decode step; work
ordered on torch's current stream; long sequences; and the retention mixer running on this backend.

``SEQMIXERS_CUPY_EMULATE=1`` runs those GPU tests on the CPU instead, with the kernels emulated
(``tests/cuda_emu``) and smaller sizes, to check the tests themselves where no GPU is at hand.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mixers
from mixers import functional
from mixers.backends.cupy import _retention
from mixers.ops.retention.reference import retention_reference
from mixers.ops.retention.testing import RetentionCase
from mixers.registry import get_registry
from mixers.testing.asserts import norm_rel_error
from mixers.testing.strategies import MODES, gamma_values, scaled_examples
from tests import cuda_emu
from tests.cupy_checks import (
    LAYOUTS,
    OUTPUT_RTOL,
    STATE_RTOL,
    PoisonedOutputs,
    close_to_reference,
    lay_out,
    rtol_for,
)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
EMULATE = os.environ.get("SEQMIXERS_CUPY_EMULATE", "") not in ("", "0")
GRAD_RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}  # RMS, relative
# Sizes the GPU tests draw from (smaller when emulated: the CPU runs every thread of every block).
MAX_T, MAX_D, BUDGET = (200, 80, 300_000) if EMULATE else (2048, 256, 40_000_000)


# --- everywhere ------------------------------------------------------------------------------------


def test_registered_for_cuda_below_the_torch_backend():
    backends = get_registry().backends["retention"]
    cupy = backends["cupy"]
    assert cupy.plugin == "mixers.backends.cupy" and get_registry().plugins["mixers.backends.cupy"].builtin
    assert cupy.priority < backends["torch"].priority
    assert cupy.devices == frozenset({"cuda"})
    assert cupy.dtypes == frozenset(DTYPES)
    assert cupy.modes is None and cupy.fn is _retention.retention and cupy.traceable is False


def test_auto_never_picks_cupy():
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        for dtype in DTYPES:
            for mode in MODES:
                chosen = get_registry().resolve_backend("retention", "auto", device=device, dtype=dtype, mode=mode)
                assert chosen.name != "cupy", (device, dtype, mode)


def test_says_why_it_is_unavailable():
    reason = get_registry().unavailable_reason(get_registry().backends["retention"]["cupy"])
    if reason is None:
        pytest.skip("the cupy backend is available here")
    assert any(s in reason for s in ("CuPy is not installed (pip install seqmixers[cuda]", "no CUDA device",
                                     "CuPy cannot reach", "CuPy failed to import")), reason  # fmt: skip


def test_asking_for_it_on_cpu_tensors_raises_the_reason():
    q = torch.randn(1, 3, 1, 4)
    registry = get_registry()
    reason = registry.unavailable_reason(registry.backends["retention"]["cupy"])
    with pytest.raises(ValueError) as info:
        functional.retention(q, q, q, 0.9, mode="chunkwise", backend="cupy")
    assert (reason or "runs on ['cuda'] devices, not 'cpu'") in str(info.value)


def test_imports_and_lists_without_cupy():
    """With CuPy unimportable, the plugin still loads and ``python -m mixers list`` says why it can't run."""
    code = "import sys; sys.modules['cupy'] = None; from mixers.__main__ import main; main(['list'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    line = next(row for row in out.splitlines() if "retention/cupy" in row)
    assert "unavailable (CuPy is not installed (pip install seqmixers[cuda]" in line
    plugin = next(row for row in out.splitlines() if row.strip().startswith("mixers.backends.cupy"))
    assert plugin.rstrip().endswith("ok")


@pytest.mark.parametrize("mode", MODES)
def test_empty_sequences_need_no_kernel(mode):
    """T = 0 is answered by the torch backend (nothing to launch), so it works on any machine."""
    q, v = torch.zeros(2, 0, 3, 4), torch.zeros(2, 0, 3, 5)
    s0 = torch.randn(2, 3, 4, 5)
    g = torch.full((3,), 0.5, dtype=torch.float64)
    o, s = _retention.retention(q, q, v, g, mode=mode, chunk_size=None, initial_state=s0)
    assert o.shape == (2, 0, 3, 5) and torch.equal(s, s0)


@dataclasses.dataclass
class _Limits:
    max_smem: int
    num_sms: int = 132
    tensor_cores: bool = True


def test_head_sizes_the_kernels_take():
    h100, small = _Limits(227 * 1024), _Limits(64 * 1024)
    assert _retention.kernels_fit(h100, torch.bfloat16, 512, 512)
    assert _retention.kernels_fit(h100, torch.float32, 512, 512)
    assert not _retention.kernels_fit(h100, torch.bfloat16, 513, 64)
    assert not _retention.kernels_fit(h100, torch.float32, 64, 600)  # the backward runs with key size Dv
    assert _retention.kernels_fit(small, torch.bfloat16, 64, 64)
    assert not _retention.kernels_fit(small, torch.float32, 256, 64)


# --- on a GPU (or emulated) ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def device():
    """The device the kernels run on: CUDA through CuPy, or the CPU through the emulator when asked."""
    if not EMULATE:
        pytest.importorskip("cupy", reason="CuPy is not installed: the kernels cannot run here")
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device: the kernels cannot run here")
        reason = get_registry().unavailable_reason(get_registry().backends["retention"]["cupy"])
        assert reason is None, f"CuPy and a CUDA device are here, yet the backend is unavailable: {reason}"
        yield torch.device("cuda")
        return
    if cuda_emu.compiler() is None:
        pytest.skip("no C++ compiler to build the emulated kernels")
    with cuda_emu.emulated_backend(cuda_emu.EmuRuntime(cuda_emu.build(), schedule=3)):
        yield torch.device("cpu")


def cupy_retention(q, k, v, gamma, **kw):
    return functional.retention(q, k, v, gamma, backend="cupy", **kw)


@st.composite
def gpu_cases(draw, max_T: int = MAX_T, max_D: int = MAX_D, budget: int = BUDGET):
    dtype = draw(st.sampled_from(DTYPES))
    B, H = draw(st.integers(1, 2)), draw(st.integers(1, 4))
    Dk, Dv = draw(st.integers(1, max_D)), draw(st.integers(1, max_D))
    T = draw(st.integers(1, max(1, min(max_T, budget // (B * H * Dk * Dv)))))
    case = RetentionCase(
        B=B, T=T, H=H, Dk=Dk, Dv=Dv, gamma=tuple(draw(st.lists(gamma_values, min_size=H, max_size=H))),
        chunk_size=draw(st.integers(1, T + 5)), with_state=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)), dtype=dtype,
    )  # fmt: skip
    return case, draw(st.sampled_from(MODES)), draw(st.sampled_from(LAYOUTS))


def inputs_on(case: RetentionCase, device: torch.device, requires_grad: bool = False):
    q, k, v, s0 = case.tensors()
    q, k, v = (t.to(device).requires_grad_(requires_grad) for t in (q, k, v))
    if s0 is not None:
        s0 = s0.to(device).requires_grad_(requires_grad)
    return q, k, v, s0


def float64_results(q, k, v, gamma, s0, absolute: bool = False):
    """Float64 output and state: the literal reference on the CPU when cheap, else the torch backend in
    float64 on the inputs' device (itself checked against the reference in test_retention_op.py)."""
    if absolute:
        q, k, v, s0 = q.abs(), k.abs(), v.abs(), None if s0 is None else s0.abs()
    B, T, H, Dk = q.shape
    if B * H * T * T * max(Dk, v.shape[-1]) <= 5e7:
        o, s = retention_reference(*(t.detach().cpu() for t in (q, k, v)), gamma.cpu(),
                                   None if s0 is None else s0.detach().cpu())  # fmt: skip
        return o.to(q.device), s.to(q.device)
    d = [None if t is None else t.detach().double() for t in (q, k, v, s0)]
    return functional.retention(*d[:3], gamma, mode="chunkwise", initial_state=d[3], backend="torch")


@settings(max_examples=scaled_examples(1.0))
@given(drawn=gpu_cases())
def test_forward_matches_float64_and_the_torch_backend(device, drawn):
    case, mode, layout = drawn
    q, k, v, s0 = inputs_on(case, device)
    g = case.gamma_tensor.to(device)
    with pytest.MonkeyPatch.context() as mp:
        poison = PoisonedOutputs(mp)
        o, s = cupy_retention(*(lay_out(t, layout) for t in (q, k, v)), g, mode=mode, chunk_size=case.chunk_size,
                              initial_state=s0)  # fmt: skip
        poison.check()
    assert o.dtype == case.dtype and o.device == q.device and s.dtype == torch.float32
    ref_o, ref_s = float64_results(q, k, v, g, s0)
    abs_o, abs_s = float64_results(q, k, v, g, s0, absolute=True)
    base_o, base_s = functional.retention(q, k, v, g, mode=mode, chunk_size=case.chunk_size, initial_state=s0,
                                          backend="torch")  # fmt: skip
    what = f"{mode}, {layout}, {case}"
    out_tol, state_tol = rtol_for(OUTPUT_RTOL, case.dtype, case.T), rtol_for(STATE_RTOL, case.dtype, case.T)
    close_to_reference(o, ref_o, abs_o, out_tol, f"output ({what})", baseline=base_o)
    close_to_reference(s, ref_s, abs_s, state_tol, f"state ({what})", baseline=base_s)


def loss_grads(run, inputs, do, ds):
    o, s = run(*inputs)
    present = [t for t in inputs if t is not None]
    return torch.autograd.grad((o.double() * do.double()).sum() + (s.double() * ds.double()).sum(), present)


@settings(max_examples=scaled_examples(0.5))
@given(drawn=gpu_cases(max_T=min(MAX_T, 1024), max_D=min(MAX_D, 128), budget=BUDGET // 4))
def test_gradients_match_float64_and_the_torch_backend(device, drawn):
    case, mode, layout = drawn
    inputs = inputs_on(case, device, requires_grad=True)
    g = case.gamma_tensor.to(device)
    gen = torch.Generator().manual_seed(case.seed + 1)
    do = torch.randn(case.B, case.T, case.H, case.Dv, generator=gen).to(device, case.dtype)
    ds = torch.randn(case.B, case.H, case.Dk, case.Dv, generator=gen).to(device)
    with pytest.MonkeyPatch.context() as mp:
        poison = PoisonedOutputs(mp)
        got = loss_grads(lambda q, k, v, s0: cupy_retention(*(lay_out(t, layout) for t in (q, k, v)), g, mode=mode,
                                                            initial_state=s0), inputs, do, ds)  # fmt: skip
        poison.check()
    wide = [None if t is None else t.detach().double().requires_grad_(True) for t in inputs]
    want = loss_grads(lambda q, k, v, s0: functional.retention(q, k, v, g, mode="chunkwise", initial_state=s0,
                                                               backend="torch"), wide, do, ds)  # fmt: skip
    base = loss_grads(lambda q, k, v, s0: functional.retention(q, k, v, g, mode=mode, initial_state=s0,
                                                               backend="torch"), inputs, do, ds)  # fmt: skip
    for name, a, w, b, x in zip("qkvS", got, want, base, [t for t in inputs if t is not None], strict=False):
        what = f"d{name} ({mode}, {layout}, {case})"
        assert a.dtype == x.dtype and a.shape == x.shape and torch.isfinite(a).all(), what
        err, base_err = norm_rel_error(a, w), norm_rel_error(b, w)
        tol = GRAD_RTOL[x.dtype]
        assert err <= tol or w.abs().max() < 1e-30, f"{what}: RMS error {err:.3e} > {tol:.1e}"
        assert err <= 1.5 * base_err + 1e-6, f"{what}: RMS error {err:.3e}, torch backend's {base_err:.3e}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_repeated_runs_are_bit_identical(device, dtype, mode):
    case = RetentionCase(B=2, T=300, H=3, Dk=72, Dv=100, gamma=(1.0, 0.99, 0.5), chunk_size=64, with_state=True,
                         seed=6, dtype=dtype)  # fmt: skip
    inputs = inputs_on(case, device, requires_grad=True)
    g = case.gamma_tensor.to(device)
    runs = []
    for _ in range(3):
        o, s = cupy_retention(*inputs[:3], g, mode=mode, initial_state=inputs[3])
        grads = torch.autograd.grad(o.float().square().sum() + s.square().sum(), inputs)
        runs.append([o, s, *grads])
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other, strict=True))


@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=str)
def test_tensor_core_and_cuda_core_kernels_agree(device, dtype):
    case = RetentionCase(B=2, T=333, H=2, Dk=128, Dv=96, gamma=(1 - 2**-6, 0.9), chunk_size=64, with_state=True,
                         seed=7, dtype=dtype)  # fmt: skip
    q, k, v, s0 = inputs_on(case, device)
    g = case.gamma_tensor.to(device)
    rt = _retention.cupy_runtime(device)
    ref_o, ref_s = float64_results(q, k, v, g, s0)
    abs_o, abs_s = float64_results(q, k, v, g, s0, absolute=True)
    for kind in ("mma", "simt"):
        o, s = _retention.chunk_retention(rt, q, k, v, g, s0, kind=kind)
        close_to_reference(o, ref_o, abs_o, OUTPUT_RTOL[dtype], f"{kind} output")
        close_to_reference(s, ref_s, abs_s, STATE_RTOL[dtype], f"{kind} state")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_steps_continue_the_prefill(device, dtype):
    """Prefill chunkwise, then decode token by token (T = 1, batched over B and H): as one pass."""
    B, H, Dk, Dv = (2, 3, 32, 40) if EMULATE else (8, 16, 128, 256)
    case = RetentionCase(B=B, T=100, H=H, Dk=Dk, Dv=Dv, gamma=tuple(1 - 2.0 ** -(5 + h) for h in range(H)),
                         chunk_size=64, with_state=True, seed=8, dtype=dtype)  # fmt: skip
    q, k, v, s0 = inputs_on(case, device)
    g = case.gamma_tensor.to(device)
    o, s = cupy_retention(q[:, :95], k[:, :95], v[:, :95], g, mode="chunkwise", initial_state=s0)
    steps = []
    for t in range(95, 100):
        o_t, s = cupy_retention(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], g, mode="recurrent",
                                initial_state=s)  # fmt: skip
        steps.append(o_t)
    o = torch.cat([o, *steps], dim=1)
    ref_o, ref_s = float64_results(q, k, v, g, s0)
    abs_o, abs_s = float64_results(q, k, v, g, s0, absolute=True)
    close_to_reference(o, ref_o, abs_o, OUTPUT_RTOL[dtype], "output")
    close_to_reference(s, ref_s, abs_s, STATE_RTOL[dtype], "state")


def test_kernels_run_on_torchs_current_stream(device):
    """On a side stream, inputs written after a long wait: kernels queued elsewhere would read them early.

    The kernels are launched through the backend's launch code directly, with a device-side gamma:
    ``functional.retention`` checks its inputs, which waits for the stream and would hide a wrong one."""
    if device.type != "cuda":
        pytest.skip("streams exist on a GPU only")
    rt = _retention.cupy_runtime(device)
    case = RetentionCase(B=2, T=500, H=2, Dk=64, Dv=64, gamma=(0.99, 1.0), chunk_size=64, with_state=False, seed=9,
                         dtype=torch.bfloat16)  # fmt: skip
    q, k, v, _ = inputs_on(case, device)
    g = case.gamma_tensor.to(device)
    expected, _ = functional.retention(q, k, v, g, mode="chunkwise", backend="torch")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        late = [torch.zeros_like(t) for t in (q, k, v)]
        torch.cuda._sleep(200_000_000)  # about 0.1 s of spinning before the inputs are written
        for dst, src in zip(late, (q, k, v), strict=True):
            dst.copy_(src)
        o, _ = _retention.run(rt, *late, g, mode="chunkwise", initial_state=None)
        o_rec, _ = _retention.run(rt, *late, g, mode="recurrent", initial_state=None)
    torch.cuda.current_stream().wait_stream(side)
    assert norm_rel_error(o, expected) < 2e-2 and norm_rel_error(o_rec, expected) < 2e-2


def test_long_sequence(device):
    T = 4096 if EMULATE else 16384
    case = RetentionCase(B=1, T=T, H=2, Dk=16 if EMULATE else 128, Dv=16 if EMULATE else 128,
                         gamma=(1.0, 1 - 2**-10), chunk_size=64, with_state=True, seed=10,
                         dtype=torch.bfloat16)  # fmt: skip
    q, k, v, s0 = inputs_on(case, device)
    g = case.gamma_tensor.to(device)
    o, s = cupy_retention(q, k, v, g, mode="chunkwise", initial_state=s0)
    ref_o, ref_s = float64_results(q, k, v, g, s0)
    base_o, base_s = functional.retention(q, k, v, g, mode="chunkwise", initial_state=s0, backend="torch")
    assert norm_rel_error(o, ref_o) <= 1.5 * norm_rel_error(base_o, ref_o) + 1e-6
    assert norm_rel_error(s, ref_s) <= 1.5 * norm_rel_error(base_s, ref_s) + 1e-6


def test_head_sizes_beyond_the_kernels_use_the_torch_backend(device):
    case = RetentionCase(B=1, T=70, H=1, Dk=520, Dv=8, gamma=(0.9,), chunk_size=64, with_state=True, seed=11,
                         dtype=torch.float32)  # fmt: skip
    q, k, v, s0 = inputs_on(case, device)
    g = case.gamma_tensor.to(device)
    got = cupy_retention(q, k, v, g, mode="chunkwise", initial_state=s0)
    want = functional.retention(q, k, v, g, mode="chunkwise", initial_state=s0, backend="torch")
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_retention_mixer_on_this_backend(device):
    """The MSR mixer on the cupy backend: modes agree, a split run equals one pass, and outputs and
    gradients match the same mixer on the torch backend."""
    torch.manual_seed(0)
    mixer = mixers.build("retention", 64, num_heads=2, backend="cupy").to(device)
    twin = mixers.build("retention", 64, num_heads=2, backend="torch").to(device)
    twin.load_state_dict(mixer.state_dict())
    x = torch.randn(2, 150, 64, device=device)
    y, state = mixer(x, mode="parallel")
    for mode, chunk in [("chunkwise", 16), ("recurrent", None)]:
        y_mode, _ = mixer(x, mode=mode, chunk_size=chunk)
        assert norm_rel_error(y_mode, y) < 1e-5, mode
    y1, s1 = mixer(x[:, :70], mode="chunkwise")
    y2, s2 = mixer(x[:, 70:], s1, mode="recurrent")
    assert norm_rel_error(torch.cat([y1, y2], dim=1), y) < 1e-5
    y_twin, _ = twin(x, mode="parallel")
    assert norm_rel_error(y, y_twin) < 1e-5
    w = torch.randn_like(y)
    grads = torch.autograd.grad((mixer(x)[0] * w).sum(), list(mixer.parameters()))
    grads_twin = torch.autograd.grad((twin(x)[0] * w).sum(), list(twin.parameters()))
    for (name, _), a, b in zip(mixer.named_parameters(), grads, grads_twin, strict=True):
        assert norm_rel_error(a, b) < 1e-4, name
