"""``mixers.functional.retention`` in every mode equals a float64 reference written from the formula.

The reference (``mixers.testing.reference``) evaluates
``o_t = sum_{s<=t} gamma^(t-s) (q_t . k_s) v_s + gamma^(t+1) q_t S_0`` and
``S_T = gamma^T S_0 + sum_s gamma^(T-1-s) k_s^T v_s`` with plain powers; a literal double loop below
checks the reference itself on small inputs.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import example, given, settings

from mixers import functional
from mixers.ops.checks import state_dtype
from mixers.ops.retention.reference import retention_reference
from mixers.ops.retention.testing import RetentionCase, retention_cases
from mixers.testing import RTOL, assert_rel_close, norm_rel_error
from mixers.testing.strategies import MODES


def run_all_modes(case: RetentionCase) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    q, k, v, s0 = case.tensors()
    return {
        mode: functional.retention(
            q, k, v, list(case.gamma), mode=mode, chunk_size=case.chunk_size, initial_state=s0, backend="torch"
        )
        for mode in MODES
    }


def check_against_reference(case: RetentionCase) -> None:
    q, k, v, s0 = case.tensors()
    ref_o, ref_s = retention_reference(q, k, v, case.gamma_tensor, s0)
    # The same sums over absolute values: the scale rounding errors are relative to (sums may cancel).
    abs_o, abs_s = retention_reference(q.abs(), k.abs(), v.abs(), case.gamma_tensor, None if s0 is None else s0.abs())
    rtol = RTOL[case.dtype]
    for mode, (o, s) in run_all_modes(case).items():
        assert o.dtype == case.dtype and o.shape == (case.B, case.T, case.H, case.Dv), mode
        assert s.dtype == state_dtype(case.dtype) and s.shape == (case.B, case.H, case.Dk, case.Dv), mode
        assert_rel_close(o, ref_o, rtol, f"{mode} output ({case})", scale=abs_o)
        assert_rel_close(s, ref_s, rtol, f"{mode} final state ({case})", scale=abs_s)


LARGEST = RetentionCase(
    B=3, T=300, H=4, Dk=64, Dv=64, gamma=(1.0, 1 - 2**-12, 0.5, 1e-6), chunk_size=37, with_state=True, seed=0
)


@given(case=retention_cases(dtypes=(torch.float64, torch.float32)))
@example(case=LARGEST)
@example(case=RetentionCase(B=3, T=300, H=4, Dk=64, Dv=64, gamma=(1.0,) * 4, chunk_size=305, with_state=True, seed=1))
@example(
    case=RetentionCase(B=1, T=300, H=2, Dk=64, Dv=64, gamma=(1e-300, 1e-30), chunk_size=1, with_state=True, seed=2)
)
@example(case=RetentionCase(B=2, T=1, H=1, Dk=1, Dv=1, gamma=(1.0,), chunk_size=1, with_state=False, seed=3))
@example(
    case=RetentionCase(
        B=2,
        T=300,
        H=3,
        Dk=64,
        Dv=64,
        gamma=(1.0, 0.9, 1e-3),
        chunk_size=300,
        with_state=True,
        seed=4,
        dtype=torch.float32,
    )
)
def test_every_mode_matches_float64_reference(case):
    check_against_reference(case)


@pytest.mark.parametrize("chunk_size", [1, 2, 5, 16, 64, 100, 101, 105])
def test_chunkwise_any_chunk_size(chunk_size):
    """Chunk sizes that divide T, that don't, equal to T, and larger than T."""
    case = RetentionCase(B=2, T=100, H=2, Dk=8, Dv=12, gamma=(1.0, 0.8), chunk_size=chunk_size, with_state=True, seed=5)
    check_against_reference(case)


def test_reference_is_the_formula():
    """The vectorised reference equals a literal double sum over (t, s) on a small input."""
    case = RetentionCase(B=2, T=7, H=2, Dk=3, Dv=4, gamma=(0.7, 1.0), chunk_size=1, with_state=True, seed=6)
    q, k, v, s0 = case.tensors()
    ref_o, ref_s = retention_reference(q, k, v, case.gamma_tensor, s0)
    for b in range(case.B):
        for h in range(case.H):
            g = case.gamma[h]
            for t in range(case.T):
                o = g ** (t + 1) * (q[b, t, h] @ s0[b, h])
                for s in range(t + 1):
                    o = o + g ** (t - s) * torch.dot(q[b, t, h], k[b, s, h]) * v[b, s, h]
                torch.testing.assert_close(ref_o[b, t, h], o, rtol=1e-12, atol=1e-12)
            state = g**case.T * s0[b, h]
            for s in range(case.T):
                state = state + g ** (case.T - 1 - s) * torch.outer(k[b, s, h], v[b, s, h])
            torch.testing.assert_close(ref_s[b, h], state, rtol=1e-12, atol=1e-12)


def test_gamma_forms_are_equivalent():
    """One float, a list of H floats and a float64/float32 tensor [H] or scalar tensor give the same result."""
    case = RetentionCase(B=1, T=20, H=3, Dk=4, Dv=4, gamma=(0.9,) * 3, chunk_size=6, with_state=False, seed=7)
    q, k, v, _ = case.tensors()
    forms = [0.9, [0.9] * 3, (0.9, 0.9, 0.9), torch.full((3,), 0.9, dtype=torch.float64), torch.tensor(0.9)]
    expected, _ = retention_reference(q, k, v, case.gamma_tensor)
    for gamma in forms:
        for mode in MODES:
            o, _ = functional.retention(q, k, v, gamma, mode=mode, chunk_size=6)
            assert_rel_close(o, expected, 1e-6 if isinstance(gamma, torch.Tensor) else 1e-12, f"{gamma!r} {mode}")


def test_gamma_is_a_constant_and_q_k_v_are_differentiated():
    """The op differentiates w.r.t. q, k, v and the state; gamma is a constant, so a gamma that requires
    grad is refused (it would silently never learn) rather than detached."""
    case = RetentionCase(B=1, T=9, H=2, Dk=3, Dv=2, gamma=(0.5, 1.0), chunk_size=4, with_state=True, seed=8)
    q, k, v, s0 = case.tensors(requires_grad=True)
    gamma = torch.tensor(case.gamma, dtype=torch.float64)
    o, s = functional.retention(q, k, v, gamma, mode="parallel", initial_state=s0)
    (o.sum() + s.sum()).backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v, s0))
    with pytest.raises(ValueError, match="gamma must not require grad"):
        functional.retention(q, k, v, gamma.requires_grad_(), mode="parallel", initial_state=s0)


def test_default_chunk_size_handles_long_unaligned_sequences():
    case = RetentionCase(B=1, T=150, H=1, Dk=4, Dv=4, gamma=(0.99,), chunk_size=1, with_state=True, seed=9)
    q, k, v, s0 = case.tensors()
    ref_o, ref_s = retention_reference(q, k, v, case.gamma_tensor, s0)
    o, s = functional.retention(q, k, v, 0.99, mode="chunkwise", initial_state=s0)  # default chunk size 64
    assert_rel_close(o, ref_o, 1e-9, "output")
    assert_rel_close(s, ref_s, 1e-9, "state")


@pytest.mark.parametrize("mode", MODES)
def test_empty_sequence_returns_the_initial_state(mode):
    q = torch.zeros(2, 0, 3, 4)
    v = torch.zeros(2, 0, 3, 5)
    s0 = torch.randn(2, 3, 4, 5)
    o, s = functional.retention(q, q, v, 0.5, mode=mode, chunk_size=3, initial_state=s0)
    assert o.shape == (2, 0, 3, 5)
    torch.testing.assert_close(s, s0, rtol=0, atol=0)
    _, s = functional.retention(q, q, v, 0.5, mode=mode, chunk_size=3)
    assert s.shape == (2, 3, 4, 5) and s.dtype == torch.float32 and not s.any()


@pytest.mark.parametrize("mode", MODES)
def test_bfloat16_inputs_within_2e_2_of_reference(mode):
    """bf16 in, bf16 out, float32 state; within 2e-2 (relative RMS) of float64 on the same bf16 inputs."""
    case = RetentionCase(
        B=2,
        T=200,
        H=3,
        Dk=32,
        Dv=48,
        gamma=(1.0, 1 - 2**-8, 0.5),
        chunk_size=48,
        with_state=True,
        seed=10,
        dtype=torch.bfloat16,
    )
    q, k, v, s0 = case.tensors()
    ref_o, ref_s = retention_reference(q, k, v, case.gamma_tensor, s0)
    o, s = functional.retention(q, k, v, list(case.gamma), mode=mode, chunk_size=48, initial_state=s0)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    assert norm_rel_error(o, ref_o) < 2e-2
    assert norm_rel_error(s, ref_s) < 2e-2


def test_hypothesis_profiles():
    """``ci`` (derandomised, no deadline) under CI, ``dev`` (more examples) on request, as conftest promises."""
    ci, dev = settings.get_profile("ci"), settings.get_profile("dev")
    assert ci.derandomize and ci.deadline is None and dev.deadline is None
    assert dev.max_examples > ci.max_examples
    chosen = os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "default")
    assert settings.default.max_examples == settings.get_profile(chosen).max_examples
    assert settings.default.derandomize == settings.get_profile(chosen).derandomize
