"""seqmixers-fla: registration, the reason it is unavailable, the adapter's math, and the GPU conformance run.

Without a GPU, fla's Triton kernels cannot run, so the adapter (everything between the op contract and
the kernels: log decays, layouts, scale, states, the normaliser and its guard) is checked with the conformance
kit against ``emulated_simple_gla``, a token-by-token torch rendering of the kernels' documented contract.
The kernels themselves are checked by the GPU tests at the end, which skip here with the reason.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import warnings

import mixers
import pytest
import torch
from mixers import functional
from mixers.testing import check_mixer, check_op_backend, mixer_conformance_tests, op_conformance_tests

if "fla" not in mixers.get_registry().backends.get("retention", {}):  # entry points come from installed metadata
    pytest.skip("seqmixers-fla is not installed: pip install -e plugins/seqmixers-fla", allow_module_level=True)

import seqmixers_fla  # noqa: E402
from seqmixers_fla import adapter  # noqa: E402

OPS = ("retention", "gated_retention", "linear_attention")
GPU_READY = torch.cuda.is_available() and importlib.util.find_spec("fla") is not None


def emulated_simple_gla(
    q, k, v, g=None, g_gamma=None, scale=None, initial_state=None, output_final_state=False, **kwargs
):
    """fla's ``simple_gla`` contract: ``S_t = exp(g_t) S_{t-1} + k_t^T v_t``, ``o_t = scale q_t S_t``, float32 state.

    A stand-in for ``chunk_simple_gla`` / ``fused_recurrent_simple_gla`` on the CPU; like fla 0.2 it warns
    when T < H, which the adapter must silence. It refuses a -inf log decay: fla's chunk kernels take
    differences of running sums of g, and ``-inf - -inf`` is NaN.
    """
    assert not kwargs and g_gamma is None, kwargs
    assert g is None or not torch.isneginf(g).any(), "a -inf log decay reached fla's kernels"
    B, T, H, K = q.shape
    if T < H:
        message = f"Input tensor shape suggests potential format mismatch: seq_len ({T}) < num_heads ({H})."
        warnings.warn(message, UserWarning, stacklevel=2)
    scale = K**-0.5 if scale is None else scale
    S = q.new_zeros(B, H, K, v.shape[-1], dtype=torch.float32) if initial_state is None else initial_state.float()
    outs = []
    for t in range(T):
        if g is not None:
            S = S * torch.exp(g[:, t].float())[..., None, None]
        S = S + k[:, t].float()[..., :, None] * v[:, t].float()[..., None, :]
        outs.append(scale * (q[:, t].float()[..., None, :] @ S).squeeze(-2))
    return torch.stack(outs, dim=1).to(q.dtype), (S if output_final_state else None)


@pytest.fixture
def emulated(monkeypatch):
    """Backend ``fla_emulated`` (the adapter on emulated kernels, CPU allowed) in the process registry."""
    monkeypatch.setattr(adapter, "_kernels", lambda: (emulated_simple_gla, emulated_simple_gla))
    registry = mixers.get_registry()
    with contextlib.ExitStack() as stack:
        for op in OPS:
            fla = registry.backends[op]["fla"]
            emulated = dataclasses.replace(fla, name="fla_emulated", devices=None, check_available=None)
            stack.enter_context(registry.temporary_backend(emulated))
        yield "fla_emulated"


def test_registered_for_each_op_through_the_entry_point_below_torch():
    registry = mixers.get_registry()
    for op in OPS:
        backend = registry.backends[op]["fla"]
        info = registry.plugins[backend.plugin]
        assert info.distribution == "seqmixers-fla" and not info.builtin and info.ok, info
        assert backend.priority == seqmixers_fla.PRIORITY < registry.backends[op]["torch"].priority
        assert backend.devices == frozenset({"cuda"}) and torch.float64 not in backend.dtypes


@pytest.mark.skipif(GPU_READY, reason="fla and a GPU are present: the backend is available")
def test_unavailable_here_with_the_precise_reason():
    reason = seqmixers_fla.check_available()
    expected = []
    if importlib.util.find_spec("fla") is None:
        expected.append("flash-linear-attention is not installed")
    if not torch.cuda.is_available():
        expected.append("no CUDA device")
    assert reason is not None and expected and all(e in reason for e in expected), reason
    assert all("fla" not in mixers.available()[op] for op in OPS)
    q = torch.randn(1, 4, 2, 3)
    with pytest.raises(ValueError, match="backend 'fla' for op 'retention' is unavailable: .*" + expected[0]):
        functional.retention(q, q, q, 0.9, mode="parallel", backend="fla")
    with pytest.raises(ValueError, match="backend 'fla' for op 'gated_retention' is unavailable: .*" + expected[0]):
        functional.gated_retention(q, q, q, torch.zeros(1, 4, 2), mode="parallel", backend="fla")
    _, state = functional.retention(q, q, q, 0.9, mode="parallel")  # "auto" passes over it
    assert state.shape == (1, 2, 3, 3)


@pytest.mark.parametrize("op", OPS)
def test_adapter_passes_the_op_conformance_kit_on_emulated_kernels(emulated, op):
    check_op_backend(op, emulated, max_examples=15)


@pytest.mark.parametrize("name", OPS)
def test_mixers_pass_the_conformance_kit_on_emulated_kernels(emulated, name):
    check_mixer(name, emulated, max_examples=8)


DECODE = {
    "retention": lambda q, backend: functional.retention(
        q, q, q, [0.9, 0.8, 0.7, 0.6], mode="recurrent", backend=backend
    ),
    "gated_retention": lambda q, backend: functional.gated_retention(
        q, q, q, torch.tensor([[[-0.1, -0.2, -float("inf"), 0.0]]]).expand(2, 1, 4), mode="recurrent", backend=backend
    ),
}


@pytest.mark.parametrize("op", DECODE)
def test_decoding_one_token_with_more_heads_than_tokens_raises_no_warning(emulated, op):
    """T = 1 < H is how decoding looks; fla's layout warning must not reach the user (warnings are errors here)."""
    q = torch.randn(2, 1, 4, 8)
    o, state = DECODE[op](q, emulated)
    expected, expected_state = DECODE[op](q, "torch")
    torch.testing.assert_close(o, expected)
    torch.testing.assert_close(state, expected_state)


def _gated_inputs(B: int, T: int, H: int = 3, Dk: int = 5, Dv: int = 4):
    """q, k, v, g and an initial state for gated retention: mixed log decays with forgetting tokens (-inf)."""
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(B, T, H, Dk, generator=gen) * Dk**-0.25 for _ in range(2))
    v = torch.randn(B, T, H, Dv, generator=gen)
    g = -3 * torch.rand(B, T, H, generator=gen)
    g[:, 2, 0] = g[:, T - 3, 1:] = -float("inf")
    return q, k, v, g, torch.randn(B, H, Dk, Dv, generator=gen)


@pytest.mark.parametrize("mode", ["parallel", "chunkwise", "recurrent"])
def test_gated_retention_matches_torch_with_forgetting_tokens_and_a_nan_decay(emulated, mode):
    """The adapter hands fla finite log decays (the emulated kernels refuse -inf) and a NaN in g reaches only
    what it reaches in the torch backend: outputs, state and gradients match the torch backend's."""
    q, k, v, g, s0 = _gated_inputs(B=2, T=11)
    g[1, 7, 2] = float("nan")
    runs = {}
    for backend in (emulated, "torch"):
        leaves = [x.clone().requires_grad_(True) for x in (q, k, v, g, s0)]
        o, state = functional.gated_retention(
            *leaves[:4], mode=mode, chunk_size=4, initial_state=leaves[4], backend=backend
        )
        grads = torch.autograd.grad(o[:, :7].sum(), leaves)  # nothing before the NaN sees it
        runs[backend] = (o, state, *grads)
    for got, want in zip(runs[emulated], runs["torch"], strict=True):
        torch.testing.assert_close(got, want, equal_nan=True)
    o, state, *grads = runs[emulated]
    assert o[1, 7:, 2].isnan().all() and o[1, :7].isfinite().all() and state[1, 2].isnan().all()
    assert all(grad.isfinite().all() for grad in grads)


def test_gated_retention_packed_sequences_match_torch(emulated):
    """Packed sequences (``cu_seqlens``, each from its own state row) through the op's per-sequence loop give
    what the torch backend's own packing gives."""
    q, k, v, g, s0 = _gated_inputs(B=1, T=12)
    cu = torch.tensor([0, 5, 5, 12])
    states = torch.cat([s0, -s0, 2 * s0])
    got = functional.gated_retention(
        q, k, v, g, mode="chunkwise", chunk_size=3, initial_state=states, cu_seqlens=cu, backend=emulated
    )
    want = functional.gated_retention(
        q, k, v, g, mode="chunkwise", chunk_size=3, initial_state=states, cu_seqlens=cu, backend="torch"
    )
    torch.testing.assert_close(got, want)


# -- on a GPU with fla: the real kernels (TF32 matmuls, hence the looser tolerances) -----------------------
GPU_TOLERANCE = {"rtol": 5e-3}
test_fla_retention_op = op_conformance_tests("retention", ["fla"], rtol=5e-3, grad_rtol=1e-2)
test_fla_gated_retention_op = op_conformance_tests("gated_retention", ["fla"], rtol=5e-3, grad_rtol=1e-2)
test_fla_linear_attention_op = op_conformance_tests("linear_attention", ["fla"], rtol=5e-3, grad_rtol=1e-2)
test_fla_retention_mixer = mixer_conformance_tests("retention", ["fla"], **GPU_TOLERANCE)
test_fla_gated_retention_mixer = mixer_conformance_tests("gated_retention", ["fla"], **GPU_TOLERANCE)
test_fla_linear_attention_mixer = mixer_conformance_tests("linear_attention", ["fla"], **GPU_TOLERANCE)
