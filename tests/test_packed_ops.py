"""Packed variable-length sequences (``cu_seqlens``) and padded batches (``attention_mask``) at the op level: every
registered op with a conformance spec (the built-ins, and an installed plugin's such as ``short_conv``), every mode.

Property: N sequences packed in one row, each from its own initial state, give each sequence's outputs and
final state as the float64 reference computed on that sequence alone, and the gradients of the reference;
empty and single-token sequences included. Bad ``cu_seqlens`` and mismatched states are refused by name.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mixers import functional
from mixers.functional import MODES
from mixers.registry import get_registry
from mixers.structure import map_structure
from mixers.testing.ops import state_tensors
from mixers.testing.strategies import OpInputs, scaled_examples

OPS = {name: op for name, op in get_registry().ops.items() if op.testing is not None}


def row(state, b):
    return map_structure(state, lambda t: t[b : b + 1])


@st.composite
def packs(draw, op_name: str):
    """A case of the op (B rows of T tokens, maybe initial states), and a length 0..T for each row."""
    spec = OPS[op_name].load_testing()
    case = draw(spec.cases(dtypes=(torch.float64,), max_T=12))
    inputs = case.inputs(requires_grad=True)
    B, T = next(iter(inputs.seq.values())).shape[:2]
    lengths = draw(st.lists(st.integers(0, T), min_size=B, max_size=B))
    return inputs, lengths, draw(st.sampled_from(MODES)), draw(st.integers(1, 6))


@pytest.mark.parametrize("op_name", sorted(OPS))
@settings(max_examples=scaled_examples(0.3))
@given(data=st.data())
def test_packed_sequences_equal_each_sequence_alone(op_name, data):
    op, spec = OPS[op_name], OPS[op_name].load_testing()
    inputs, lengths, mode, chunk = data.draw(packs(op_name))
    names = list(inputs.seq)
    packed = {n: torch.cat([t[b : b + 1, :L] for b, L in enumerate(lengths)], dim=1) for n, t in inputs.seq.items()}
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    o, state = op(
        **packed, **inputs.const, mode=mode, chunk_size=chunk, initial_state=inputs.state, backend="torch",
        cu_seqlens=cu,
    )  # fmt: skip
    assert o.shape[:2] == (1, sum(lengths))
    weight = torch.randn(o.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    leaves = [inputs.seq[n] for n in names]
    gradients = sum(lengths) > 0  # (all sequences empty: nothing to differentiate)
    assert o.requires_grad or not gradients, "the packed output lost its gradient"
    got = torch.autograd.grad((o * weight).sum(), leaves, allow_unused=True) if gradients else None
    want_loss = 0.0
    for b, L in enumerate(lengths):
        alone = OpInputs({n: t[b : b + 1, :L] for n, t in inputs.seq.items()}, inputs.const, row(inputs.state, b))
        ref_o, ref_s = spec.reference(alone)
        start = sum(lengths[:b])
        torch.testing.assert_close(o[:, start : start + L], ref_o, rtol=1e-9, atol=1e-9, msg=f"sequence {b} output")
        for i, (g, w) in enumerate(zip(state_tensors(row(state, b)), state_tensors(ref_s), strict=True)):
            torch.testing.assert_close(g.double(), w, rtol=1e-9, atol=1e-9, msg=f"sequence {b} state[{i}]")
        want_loss = want_loss + (ref_o * weight[:, start : start + L]).sum()
    if not gradients:
        return
    want = torch.autograd.grad(want_loss, leaves, allow_unused=True)
    for n, g, w in zip(names, got, want, strict=True):
        if w is not None:  # (no sequence may reach a row's tokens: all lengths 0)
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9, msg=f"d/d{n}")


@pytest.mark.parametrize("op_name", sorted(OPS))
@settings(max_examples=scaled_examples(0.3))
@given(data=st.data())
def test_a_padded_batch_equals_each_row_alone_and_its_padding_never_leaks(op_name, data):
    """Left or right padding per row, the padding filled with NaN: each row's real tokens give the float64
    reference's outputs, state and gradients computed on them alone; outputs at the padding are zeros."""
    op, spec = OPS[op_name], OPS[op_name].load_testing()
    inputs, lengths, mode, chunk = data.draw(packs(op_name))
    left = data.draw(st.lists(st.booleans(), min_size=len(lengths), max_size=len(lengths)))
    names = list(inputs.seq)
    T = next(iter(inputs.seq.values())).shape[1]

    def pad(t, b, L):  # row b's first L tokens, at the left or right end of T slots; NaN elsewhere
        fill = torch.full((T - L, *t.shape[2:]), float("nan"), dtype=t.dtype)
        return torch.cat([fill, t[b, :L]] if left[b] else [t[b, :L], fill])

    padded = {n: torch.stack([pad(t, b, L) for b, L in enumerate(lengths)]) for n, t in inputs.seq.items()}
    mask = torch.stack([pad(torch.ones(len(lengths), T, 1), b, L)[:, 0] for b, L in enumerate(lengths)])
    mask = mask.nan_to_num(0.0).to(torch.int64)
    o, state = op(
        **padded, **inputs.const, mode=mode, chunk_size=chunk, initial_state=inputs.state, backend="torch",
        attention_mask=mask,
    )  # fmt: skip
    real = mask.bool()
    assert torch.isfinite(o).all(), "the NaN padding reached an output"
    assert not o[~real].any(), "outputs at the padding must be zeros"
    weight = torch.randn(o.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    leaves = [inputs.seq[n] for n in names]
    gradients = sum(lengths) > 0
    got = torch.autograd.grad((o * weight).sum(), leaves, allow_unused=True) if gradients else None
    want_loss = 0.0
    for b, L in enumerate(lengths):
        alone = OpInputs({n: t[b : b + 1, :L] for n, t in inputs.seq.items()}, inputs.const, row(inputs.state, b))
        ref_o, ref_s = spec.reference(alone)
        torch.testing.assert_close(o[b][real[b]][None], ref_o, rtol=1e-9, atol=1e-9, msg=f"row {b} output")
        for i, (g, w) in enumerate(zip(state_tensors(row(state, b)), state_tensors(ref_s), strict=True)):
            torch.testing.assert_close(g.double(), w, rtol=1e-9, atol=1e-9, msg=f"row {b} state[{i}]")
        want_loss = want_loss + (ref_o * weight[b][real[b]][None]).sum()
    if not gradients:
        return
    want = torch.autograd.grad(want_loss, leaves, allow_unused=True)
    for n, g, w in zip(names, got, want, strict=True):
        if w is not None:
            assert torch.isfinite(g).all(), f"d/d{n}: the NaN padding reached a gradient"
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9, msg=f"d/d{n}")


def test_bad_attention_masks_are_refused_by_name():
    q, k, v = qkv(T=4, B=2)
    cases = [
        (torch.tensor([[1, 0, 1, 1], [1, 1, 0, 0]]), ValueError, "rows [0] have a hole in the middle"),
        (torch.ones(2, 3, dtype=torch.int64), ValueError, "attention_mask must have shape [B, T] = [2, 4]"),
        (torch.ones(2, 4), TypeError, "bool or integer tensor of 0 and 1, got dtype torch.float32"),
        (torch.full((2, 4), 2), ValueError, "attention_mask must hold only 0 and 1"),
        ([[1, 1, 1, 1]] * 2, TypeError, "attention_mask must be a 0/1 tensor [B, T], got list"),
    ]
    for mask, error, fragment in cases:
        with pytest.raises(error) as info:
            functional.retention(q, k, v, 0.9, mode="parallel", attention_mask=mask)
        assert fragment in str(info.value), (fragment, str(info.value))
    with pytest.raises(ValueError, match="give cu_seqlens .* or attention_mask .*, not both"):
        functional.retention(
            q[:1], k[:1], v[:1], 0.9, mode="parallel", cu_seqlens=torch.tensor([0, 4]), attention_mask=torch.ones(1, 4)
        )


def qkv(T=6, B=1):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, T, 2, 4, generator=g) for _ in range(3)]


@pytest.mark.parametrize(
    "cu,error,fragments",
    [
        ([1, 6], ValueError, ["must start at 0", "got 1"]),
        ([0, 5], ValueError, ["must end at the packed length T = 6", "got 5"]),
        ([0, 4, 2, 6], ValueError, ["must not decrease", "4 then 2"]),
        ([[0, 6]], ValueError, ["1-D tensor [N+1]", "[1, 2]"]),
        ([0], ValueError, ["N >= 1 sequences", "[1]"]),
    ],
)
def test_bad_cu_seqlens_are_refused_by_name(cu, error, fragments):
    q, k, v = qkv()
    with pytest.raises(error) as info:
        functional.retention(q, k, v, 0.9, mode="parallel", cu_seqlens=torch.tensor(cu))
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_cu_seqlens_must_be_an_integer_tensor_and_the_pack_one_row():
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"cu_seqlens must have dtype torch.int32 or torch.int64, got torch.float32"):
        functional.linear_attention(q.exp(), k.exp(), v, mode="parallel", cu_seqlens=torch.tensor([0.0, 6.0]))
    with pytest.raises(TypeError, match=r"cu_seqlens must be an int32 or int64 tensor \[N\+1\], got list"):
        functional.softmax_attention(q, k, v, mode="parallel", cu_seqlens=[0, 6])
    q2, k2, v2 = qkv(B=2)
    with pytest.raises(ValueError, match=r"with cu_seqlens, q must hold the packed sequences in one row .* got batch"):
        functional.retention(q2, k2, v2, 0.9, mode="parallel", cu_seqlens=torch.tensor([0, 6]))


def test_the_states_must_be_one_per_sequence():
    q, k, v = qkv()
    states = torch.zeros(3, 2, 4, 4)
    with pytest.raises(ValueError, match="cu_seqlens describes 2 sequences, initial_state holds 3"):
        functional.retention(q, k, v, 0.9, mode="parallel", initial_state=states, cu_seqlens=torch.tensor([0, 2, 6]))
    o, s = functional.retention(
        q, k, v, 0.9, mode="parallel", initial_state=states[:2], cu_seqlens=torch.tensor([0, 2, 6])
    )
    assert s.shape == (2, 2, 4, 4) and o.shape == (1, 6, 2, 4)
