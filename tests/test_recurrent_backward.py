"""Recurrent mode with gradients keeps no state per token (issue 21, item 11).

Autograd through the token loop kept every step's ``[B, H, Dk, Dv]`` state for the backward: T x the state,
more than 21 GB for fla's retention test at its head dims. The torch backend's recurrent mode now saves only
its inputs and recomputes the states in its backward (``torch_retention._Recurrent``): the bytes it saves grow
with T by the inputs' share of a token, not by a state per token. Its gradients w.r.t. q, k, v and the initial
state, through the final state too, are the float64 reference's. ``benchmarks/recurrent_backward.py`` measures
time and memory against the former loop.
"""

from __future__ import annotations

import pytest
import torch

from mixers import functional
from mixers.ops.checks import state_dtype
from mixers.ops.linear_attention.reference import linear_attention_reference
from mixers.ops.retention.reference import retention_reference

B, H, Dk, Dv = 1, 2, 16, 16
GAMMA = [0.9, 1.0]


def inputs(op: str, T: int, dtype=torch.float64, with_state=True, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    q, k, v = randn(B, T, H, Dk), randn(B, T, H, Dk) * Dk**-0.5, randn(B, T, H, Dv)
    sd = state_dtype(dtype)
    if op == "linear_attention":
        q, k = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
        state = (randn(B, H, Dk, Dv).abs().to(sd), randn(B, H, Dk).abs().to(sd)) if with_state else None
    else:
        state = (randn(B, H, Dk, Dv).to(sd),) if with_state else None
    leaves = [t.to(dtype).requires_grad_(True) for t in (q, k, v)]
    state_leaves = [s.requires_grad_(True) for s in state] if state else []
    return leaves, state_leaves


def run(op: str, leaves, state_leaves, *, reference: bool = False):
    q, k, v = leaves
    if op == "retention":
        given = state_leaves[0] if state_leaves else None
        if reference:
            return retention_reference(q, k, v, torch.tensor(GAMMA, dtype=torch.float64), given)
        return functional.retention(q, k, v, GAMMA, mode="recurrent", initial_state=given)
    given = tuple(state_leaves) if state_leaves else None
    if reference:
        return linear_attention_reference(q, k, v, given)
    return functional.linear_attention(q, k, v, mode="recurrent", initial_state=given)


def loss(o, state, seed: int):
    """A random weighting of the output and every tensor of the final state."""
    gen = torch.Generator().manual_seed(seed)
    parts = [o, *(state if isinstance(state, tuple) else (state,))]
    return sum((t.double() * torch.randn(t.shape, generator=gen, dtype=torch.float64)).sum() for t in parts)


@pytest.mark.parametrize("with_state", [False, True], ids=["fresh", "with_state"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("op", ["retention", "linear_attention"])
def test_gradients_are_the_float64_references(op, dtype, with_state):
    leaves, state_leaves = inputs(op, T=37, dtype=dtype, with_state=with_state)
    got = torch.autograd.grad(loss(*run(op, leaves, state_leaves), seed=1), [*leaves, *state_leaves])
    want = torch.autograd.grad(loss(*run(op, leaves, state_leaves, reference=True), seed=1), [*leaves, *state_leaves])
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    for name, g, w in zip(["q", "k", "v", "state[0]", "state[1]"], got, want, strict=False):
        assert g.dtype == w.dtype or g.dtype == dtype or name.startswith("state")
        err = ((g.double() - w).abs().max() / w.abs().max()).item()
        assert err <= rtol, f"{op} {dtype}: d/d{name} is {err:.2e} from the reference"


def saved_bytes_of(call) -> int:
    """Bytes of the distinct storages autograd saves for the backward of ``call()``."""
    storages: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        call()
    return sum(storages.values())


def saved_bytes(op: str, T: int) -> int:
    """Bytes autograd saves for the backward of one recurrent call of ``op`` over T tokens."""
    leaves, state_leaves = inputs(op, T, dtype=torch.float32)
    return saved_bytes_of(lambda: run(op, leaves, state_leaves))


@pytest.mark.parametrize("op", ["retention", "linear_attention"])
def test_saved_memory_does_not_grow_by_a_state_per_token(op):
    """From T = 64 to T = 256, what is saved grows per token by the inputs and outputs autograd keeps anyway (q,
    k, v: 48 values a head; linear attention also v with its ones column and the normaliser's numerator), not
    by a state (256 values a head): the old loop saved more than a state per token."""
    state = B * H * Dk * Dv * 4
    per_token = (saved_bytes(op, 256) - saved_bytes(op, 64)) / (256 - 64)
    assert per_token < state / 2, f"{per_token:.0f} bytes saved per token, a state is {state}"
