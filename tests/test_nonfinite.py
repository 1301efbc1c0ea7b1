"""A NaN or inf at position t never reaches an output before t, in any mode, and does reach the outputs from t
on (rather than being silently dropped): every backend excludes the positions a token may not see instead of
multiplying them by zero, since ``0 * NaN`` is NaN.

The conformance kit checks the first half for every registered mixer and op backend
(``nonfinite_stays_causal``); here the core ops' torch backends are held to both halves exactly (bit for bit
before t), and the CuPy kernels are run on the CPU emulator (``tests/cuda_emu``), the tensor-core one included.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._pytree import tree_flatten

from mixers import functional
from mixers.backends import nonfinite
from mixers.backends.cupy import _retention
from mixers.ops.checks import state_dtype
from tests import cuda_emu

NAN, INF = float("nan"), float("inf")
T, CHUNK = 23, 5
# Inside a chunk, at a chunk's first and last position, in the tail chunk.
SPOTS = [7, 10, 14, 21]


def op_inputs(op: str, with_state: bool, dtype=torch.float64):
    gen = torch.Generator().manual_seed(1)
    B, H, Hkv, D = 2, 4, 2, 6

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    if op == "softmax_attention":  # grouped-query heads, and a cache ahead of the new tokens
        q, k, v = randn(B, T, H, D), randn(B, T, Hkv, D), randn(B, T, Hkv, D)
        state = (randn(B, Hkv, 3, D), randn(B, Hkv, 3, D)) if with_state else None  # head-major caches
        return q, k, v, state
    q, k, v = randn(B, T, H, D), randn(B, T, H, D) * D**-0.5, randn(B, T, H, D + 1)
    if op == "linear_attention":
        q, k = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
        sd = state_dtype(dtype)
        state = (randn(B, H, D, D + 1).abs().to(sd), randn(B, H, D).abs().to(sd)) if with_state else None
    else:
        state = randn(B, H, D, D + 1).to(state_dtype(dtype)) if with_state else None
    return q, k, v, state


def call(op: str, q, k, v, state, mode: str):
    if op == "retention":
        return functional.retention(q, k, v, [0.9, 1.0, 0.5, 1e-3], mode=mode, chunk_size=CHUNK, initial_state=state)
    if op == "linear_attention":
        return functional.linear_attention(q, k, v, mode=mode, chunk_size=CHUNK, initial_state=state)
    return functional.softmax_attention(q, k, v, mode=mode, chunk_size=CHUNK, initial_state=state)


OPS = ["retention", "linear_attention", "softmax_attention"]


@pytest.mark.parametrize("with_state", [False, True], ids=["fresh", "with_state"])
@pytest.mark.parametrize("mode", functional.MODES)
@pytest.mark.parametrize("op", OPS)
def test_nonfinite_key_or_value_reaches_exactly_the_outputs_from_its_position(op, mode, with_state):
    q, k, v, state = op_inputs(op, with_state)
    o, _ = call(op, q, k, v, state, mode)
    assert torch.isfinite(o).all()
    for t in SPOTS:
        for name, value in (("k", NAN), ("v", NAN), ("v", INF), ("v", -INF), ("k", INF)):
            kk, vv = k.clone(), v.clone()
            (kk if name == "k" else vv)[:, t] = value
            o_bad, _ = call(op, q, kk, vv, state, mode)
            what = f"{op} {mode}: {value} in {name} at {t}"
            assert torch.equal(o_bad[:, :t], o[:, :t]), f"{what}: an earlier output changed"
            if name == "v" or value != value:  # (an infinite key can meet a score of -inf: weight 0, no trace)
                assert not torch.isfinite(o_bad[:, t:]).any(), f"{what}: a later output stayed finite"


@pytest.mark.parametrize("mode", functional.MODES)
@pytest.mark.parametrize("op", OPS)
def test_nonfinite_query_reaches_its_own_output_only(op, mode):
    q, k, v, state = op_inputs(op, with_state=True)
    o, _ = call(op, q, k, v, state, mode)
    for t in SPOTS:
        qq = q.clone()
        qq[:, t] = NAN
        o_bad, _ = call(op, qq, k, v, state, mode)
        assert torch.equal(o_bad[:, :t], o[:, :t]) and torch.equal(o_bad[:, t + 1 :], o[:, t + 1 :]), (op, mode, t)
        assert torch.isnan(o_bad[:, t]).all(), (op, mode, t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", OPS)
def test_nonfinite_stays_causal_in_low_precision_and_with_gradients(op, dtype):
    """The other dtypes, and the autograd path of chunkwise mode (which the no-gradient one does not take)."""
    q, k, v, state = op_inputs(op, with_state=True, dtype=dtype)
    for mode in functional.MODES:
        o, _ = call(op, q, k, v.clone().requires_grad_(True), state, mode)
        vv = v.clone()
        vv[:, 12] = NAN
        o_bad, _ = call(op, q, k, vv.requires_grad_(True), state, mode)
        assert torch.equal(o_bad[:, :12], o[:, :12]), (op, mode)
        assert not torch.isfinite(o_bad[:, 12:]).any(), (op, mode)


@pytest.mark.parametrize("mode", functional.MODES)
@pytest.mark.parametrize("op", OPS)
def test_the_exclusion_changes_nothing_for_finite_inputs(op, mode, monkeypatch):
    """On the CPU, finite values skip the exclusion (a sum over them tells); on a GPU it always runs, so it must
    give finite inputs the very same outputs, states and gradients. Forced on here, it does, bit for bit."""
    q, k, v, state = op_inputs(op, with_state=True)
    weight = torch.randn(q.shape[0], T, q.shape[2], v.shape[-1], dtype=torch.float64)

    def run():
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        o, s = call(op, *leaves, state, mode)
        return o, s, torch.autograd.grad((o * weight).sum(), leaves)

    expected = run()
    with torch.no_grad():
        expected_no_grad = call(op, q, k, v, state, mode)
    monkeypatch.setattr(nonfinite, "may_be_nonfinite", lambda *tensors: True)
    for got, want in ((run(), expected), (call(op, q, k, v, state, mode), expected_no_grad)):
        for a, b in zip(tree_flatten(got)[0], tree_flatten(want)[0], strict=True):
            assert torch.equal(a, b), (op, mode)


# -- the CuPy kernels, emulated on the CPU ---------------------------------------------------------------
@pytest.fixture(scope="module")
def lib():
    if cuda_emu.compiler() is None:
        pytest.skip("no C++ compiler (g++ or clang++) to build the kernels for the CPU")
    return cuda_emu.build()


KERNELS = [
    pytest.param("simt", torch.float32, id="simt-float32"),
    pytest.param("simt", torch.bfloat16, id="simt-bfloat16"),
    pytest.param("mma", torch.bfloat16, id="mma-bfloat16"),
    pytest.param("recurrent", torch.float16, id="recurrent-float16"),
]


@pytest.mark.parametrize(("kind", "dtype"), KERNELS)
def test_cupy_kernels_exclude_later_nonfinite_keys_and_values(lib, kind, dtype):
    """Chunks of 64: a NaN or inf in the second chunk (at its start, inside the 16-row diagonal block of a
    tensor-core warp, at its end) or in the tail chunk; the kernels' outputs before it are bit for bit those
    of the clean run, and from it on non-finite."""
    rt = cuda_emu.EmuRuntime(lib, num_sms=1, tensor_cores=kind == "mma")
    gen = torch.Generator().manual_seed(2)
    B, Tk, H, Dk, Dv = 1, 150, 2, 24, 40
    q = torch.randn(B, Tk, H, Dk, generator=gen).to(dtype)
    k = (torch.randn(B, Tk, H, Dk, generator=gen) * Dk**-0.5).to(dtype)
    v = torch.randn(B, Tk, H, Dv, generator=gen).to(dtype)
    s0 = torch.randn(B, H, Dk, Dv, generator=gen)
    gamma = torch.tensor([0.97, 1.0], dtype=torch.float64)
    mode = "recurrent" if kind == "recurrent" else "chunkwise"
    o, _ = _retention.run(rt, q, k, v, gamma, mode=mode, initial_state=s0)
    assert torch.isfinite(o).all()
    for t, name, value in [(64, "v", NAN), (70, "v", INF), (77, "k", NAN), (127, "v", -INF), (140, "k", NAN)]:
        kk, vv = k.clone(), v.clone()
        (kk if name == "k" else vv)[:, t, :, 3] = value  # one channel
        o_bad, _ = _retention.run(rt, q, kk, vv, gamma, mode=mode, initial_state=s0)
        what = f"{kind} {dtype}: {value} in {name}[:, {t}, :, 3]"
        assert torch.equal(o_bad[:, :t], o[:, :t]), f"{what}: an earlier output changed"
        later = o_bad[:, t:, :, 3] if name == "v" else o_bad[:, t:]  # a value channel reaches its own channel
        assert not torch.isfinite(later).any(), f"{what}: a later output stayed finite"
