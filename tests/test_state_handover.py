"""Splitting a sequence and handing the state over gives the outputs, final state and gradients of one pass."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mixers import functional
from mixers.ops.retention.reference import retention_reference
from mixers.ops.retention.testing import RetentionCase, retention_cases
from mixers.testing import RTOL, assert_rel_close
from mixers.testing.strategies import MODES, Plan, handover_plans, scaled_examples


def split_plans(dtypes=(torch.float64, torch.float32), **sizes) -> st.SearchStrategy[tuple[RetentionCase, Plan]]:
    """A case and a split of ``0..T`` into segments, each run in a drawn mode and chunk size."""
    return handover_plans(retention_cases(dtypes=dtypes, **sizes))


def run_split(q, k, v, gamma, s0, plan: Plan):
    outs, state = [], s0
    for start, stop, mode, chunk_size in plan:
        sl = slice(start, stop)
        o, state = functional.retention(
            q[:, sl], k[:, sl], v[:, sl], gamma, mode=mode, chunk_size=chunk_size, initial_state=state
        )
        outs.append(o)
    return torch.cat(outs, dim=1), state


@given(case_plan=split_plans(budget=1_500_000))
@example(
    case_plan=(
        RetentionCase(
            B=3, T=300, H=4, Dk=64, Dv=64, gamma=(1.0, 1 - 2**-12, 0.5, 1e-9), chunk_size=1, with_state=True, seed=0
        ),
        [(0, 1, "recurrent", 1), (1, 150, "chunkwise", 64), (150, 150, "parallel", 1), (150, 300, "parallel", 1)],
    )
)
def test_split_equals_one_pass(case_plan):
    case, plan = case_plan
    q, k, v, s0 = case.tensors()
    gamma = list(case.gamma)
    whole_o, whole_s = functional.retention(q, k, v, gamma, mode="parallel", initial_state=s0)
    split_o, split_s = run_split(q, k, v, gamma, s0, plan)
    abs_o, abs_s = retention_reference(q.abs(), k.abs(), v.abs(), case.gamma_tensor, None if s0 is None else s0.abs())
    assert split_o.dtype == whole_o.dtype and split_s.dtype == whole_s.dtype
    assert_rel_close(split_o, whole_o, RTOL[case.dtype], f"outputs, plan {plan}", scale=abs_o)
    assert_rel_close(split_s, whole_s, RTOL[case.dtype], f"final state, plan {plan}", scale=abs_s)


@pytest.mark.parametrize(("first", "second"), list(itertools.product(MODES, MODES)))
def test_every_pair_of_modes_hands_over(first, second):
    case = RetentionCase(B=2, T=37, H=2, Dk=5, Dv=6, gamma=(0.9, 1.0), chunk_size=4, with_state=True, seed=1)
    q, k, v, s0 = case.tensors()
    expected_o, expected_s = retention_reference(q, k, v, case.gamma_tensor, s0)
    got_o, got_s = run_split(q, k, v, list(case.gamma), s0, [(0, 13, first, 4), (13, 37, second, 5)])
    assert_rel_close(got_o, expected_o, 1e-9, "outputs")
    assert_rel_close(got_s, expected_s, 1e-9, "final state")


def loss_grads(fn, tensors, weights):
    """Gradients of ``sum(o * wo) + sum(S * ws)`` w.r.t. ``tensors`` (the leaves fed to ``fn``)."""
    o, s = fn()
    wo, ws = weights
    loss = (o.double() * wo).sum() + (s.double() * ws).sum()
    return torch.autograd.grad(loss, tensors)


@settings(max_examples=scaled_examples(0.5))
@given(case_plan=split_plans(dtypes=(torch.float64,), budget=300_000))
@example(
    case_plan=(
        RetentionCase(B=1, T=300, H=2, Dk=64, Dv=48, gamma=(1.0, 1e-6), chunk_size=7, with_state=True, seed=2),
        [(0, 100, "chunkwise", 7), (100, 101, "recurrent", 1), (101, 300, "parallel", 1)],
    )
)
def test_gradients_agree_between_modes_and_splits(case_plan):
    """d loss / d (q, k, v, S_0) is the same for the reference, every mode and a split run."""
    case, plan = case_plan
    q, k, v, s0 = case.tensors(requires_grad=True)
    leaves = [t for t in (q, k, v, s0) if t is not None]
    gen = torch.Generator().manual_seed(case.seed + 1)
    weights = (
        torch.randn(case.B, case.T, case.H, case.Dv, generator=gen, dtype=torch.float64),
        torch.randn(case.B, case.H, case.Dk, case.Dv, generator=gen, dtype=torch.float64),
    )
    gamma = list(case.gamma)
    expected = loss_grads(lambda: retention_reference(q, k, v, case.gamma_tensor, s0), leaves, weights)
    runs = {
        mode: (
            lambda mode=mode: functional.retention(
                q, k, v, gamma, mode=mode, chunk_size=case.chunk_size, initial_state=s0
            )
        )
        for mode in MODES
    }
    runs["split"] = lambda: run_split(q, k, v, gamma, s0, plan)
    for name, fn in runs.items():
        for leaf_name, got, want in zip("qkvS", loss_grads(fn, leaves, weights), expected, strict=False):
            assert_rel_close(got, want, 1e-9, f"d/d{leaf_name} in {name} (plan {plan})")


@pytest.mark.parametrize("mode", MODES)
def test_initial_state_is_not_modified(mode):
    """A state can be handed to several continuations (beam search): the op never writes into it."""
    case = RetentionCase(B=2, T=10, H=2, Dk=3, Dv=4, gamma=(0.9, 1.0), chunk_size=3, with_state=True, seed=3)
    q, k, v, s0 = case.tensors()
    kept = s0.clone()
    _, s1 = functional.retention(q, k, v, list(case.gamma), mode=mode, chunk_size=3, initial_state=s0)
    functional.retention(q, k, v, list(case.gamma), mode=mode, chunk_size=3, initial_state=s1)
    torch.testing.assert_close(s0, kept, rtol=0, atol=0)


@pytest.mark.parametrize("mode", MODES)
def test_low_precision_state_hands_over_in_float32(mode):
    """bf16 inputs produce a float32 state that the next bf16 call accepts; the split matches one pass."""
    case = RetentionCase(
        B=1, T=64, H=2, Dk=16, Dv=16, gamma=(0.95, 1.0), chunk_size=8, with_state=False, seed=4, dtype=torch.bfloat16
    )
    q, k, v, _ = case.tensors()
    whole_o, whole_s = functional.retention(q, k, v, list(case.gamma), mode=mode, chunk_size=8)
    split_o, split_s = run_split(q, k, v, list(case.gamma), None, [(0, 20, mode, 8), (20, 64, mode, 8)])
    assert split_s.dtype == torch.float32 and split_o.dtype == torch.bfloat16
    assert_rel_close(split_o, whole_o, 2e-2, "bf16 outputs")
    assert_rel_close(split_s, whole_s, 1e-5, "float32 state")
