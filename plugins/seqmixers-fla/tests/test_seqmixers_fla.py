"""seqmixers-fla: registration, the reason it is unavailable, the adapter's math, and the GPU conformance run.

Without a GPU, fla's Triton kernels cannot run, so the adapter (everything between the op contract and
the kernels: log-decays, layouts, states, the normaliser and its guard) is checked with the conformance
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

OPS = ("retention", "linear_attention")
GPU_READY = torch.cuda.is_available() and importlib.util.find_spec("fla") is not None


def emulated_simple_gla(
    q, k, v, g=None, g_gamma=None, scale=None, initial_state=None, output_final_state=False, **kwargs
):
    """fla's ``simple_gla`` contract: ``S_t = exp(g_t) S_{t-1} + k_t^T v_t``, ``o_t = scale q_t S_t``, float32 state.

    A stand-in for ``chunk_simple_gla`` / ``fused_recurrent_simple_gla`` on the CPU; like fla 0.2 it warns
    when T < H, which the adapter must silence.
    """
    assert not kwargs and g_gamma is None, kwargs
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


def test_registered_for_both_ops_through_the_entry_point_below_torch():
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
    assert "fla" not in mixers.available()["retention"]
    q = torch.randn(1, 4, 2, 3)
    with pytest.raises(ValueError, match="backend 'fla' for op 'retention' is unavailable: .*" + expected[0]):
        functional.retention(q, q, q, 0.9, mode="parallel", backend="fla")
    _, state = functional.retention(q, q, q, 0.9, mode="parallel")  # "auto" passes over it
    assert state.shape == (1, 2, 3, 3)


@pytest.mark.parametrize("op", OPS)
def test_adapter_passes_the_op_conformance_kit_on_emulated_kernels(emulated, op):
    check_op_backend(op, emulated, max_examples=15)


@pytest.mark.parametrize("name", OPS)
def test_mixers_pass_the_conformance_kit_on_emulated_kernels(emulated, name):
    check_mixer(name, emulated, max_examples=8)


def test_decoding_one_token_with_more_heads_than_tokens_raises_no_warning(emulated):
    """T = 1 < H is how decoding looks; fla's layout warning must not reach the user (warnings are errors here)."""
    q = torch.randn(2, 1, 4, 8)
    o, state = functional.retention(q, q, q, [0.9, 0.8, 0.7, 0.6], mode="recurrent", backend=emulated)
    expected, _ = functional.retention(q, q, q, [0.9, 0.8, 0.7, 0.6], mode="recurrent", backend="torch")
    torch.testing.assert_close(o, expected)


# -- on a GPU with fla: the real kernels (TF32 matmuls, hence the looser tolerances) -----------------------
GPU_TOLERANCE = {"rtol": 5e-3}
test_fla_retention_op = op_conformance_tests("retention", ["fla"], rtol=5e-3, grad_rtol=1e-2)
test_fla_linear_attention_op = op_conformance_tests("linear_attention", ["fla"], rtol=5e-3, grad_rtol=1e-2)
test_fla_retention_mixer = mixer_conformance_tests("retention", ["fla"], **GPU_TOLERANCE)
test_fla_linear_attention_mixer = mixer_conformance_tests("linear_attention", ["fla"], **GPU_TOLERANCE)
