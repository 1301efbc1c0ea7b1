"""A NaN or inf at position t reaches no gradient of an input before t (issue 21, item 5).

With ``o[:, :t].sum().backward()`` the gradient reaching the outputs from t on is zero, and a backward product
that meets it with a later NaN (``0 * NaN``) used to make ``q.grad`` NaN at every earlier position in parallel
and chunkwise mode. The torch backends of every core op are held to the clean input's gradients bit for bit,
in every mode, from a fresh start and from a state (whose gradient must stay clean too). The kit's
``nonfinite_stays_causal`` check holds every backend to the same (the CuPy kernels in ``test_cupy_emulated.py``,
the fla adapter in its plugin's tests).
"""

from __future__ import annotations

import pytest
import torch

from mixers import functional
from tests.test_nonfinite import OPS, call, op_inputs

NAN, INF = float("nan"), float("inf")


def outputs_and_gradients(op: str, q, k, v, state, mode: str, t: int):
    """The output, and the gradients of ``o[:, :t].sum()`` w.r.t. q, k, v and the state's tensors."""
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    if isinstance(state, torch.Tensor):
        state = state.clone().requires_grad_(True)
        state_leaves = [state]
    else:
        state = None if state is None else tuple(s.clone().requires_grad_(True) for s in state)
        state_leaves = list(state or ())
    o, _ = call(op, *leaves, state, mode)
    return o, torch.autograd.grad(o[:, :t].sum(), [*leaves, *state_leaves])


@pytest.mark.parametrize("with_state", [False, True], ids=["fresh", "with_state"])
@pytest.mark.parametrize("mode", functional.MODES)
@pytest.mark.parametrize("op", OPS)
def test_gradients_before_a_nonfinite_input_are_those_of_the_clean_input(op, mode, with_state):
    q, k, v, state = op_inputs(op, with_state)
    for t in (9, 10):  # inside a chunk of 5, at a chunk's start
        o, clean = outputs_and_gradients(op, q, k, v, state, mode, t)
        for which, name in enumerate("qkv"):
            for value in (NAN, INF):
                poisoned = [q, k, v]
                poisoned[which] = poisoned[which].clone()
                poisoned[which][:, t] = value
                what = f"{op} {mode}: {value} in {name}[:, {t}]"
                o_bad, grads = outputs_and_gradients(op, *poisoned, state, mode, t)
                assert torch.equal(o_bad[:, :t], o[:, :t]), f"{what}: an earlier output changed"
                assert not torch.isfinite(o_bad[:, t]).all(), f"{what}: its own output stayed finite"
                for leaf, g, g_clean in zip(["q", "k", "v", "state[0]", "state[1]"], grads, clean, strict=False):
                    if leaf in ("q", "k", "v"):
                        g, g_clean = g[:, :t], g_clean[:, :t]
                    assert torch.equal(g, g_clean), f"{what}: d/d{leaf} before it differs from the clean one"
