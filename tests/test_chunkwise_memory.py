"""Chunkwise retention (and linear attention, which runs it) in bounded memory.

Without gradients the torch backend computes ``GROUP`` chunks at a time, keeping the running state only, so no
intermediate grows with T; with gradients it keeps every chunk's incoming state for the backward, unless
``checkpoint_states()`` asks it to keep one every few chunks and recompute the rest. Memory is shown without
timing: by the shapes of the tensors every aten op produces, and of the tensors autograd saves.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from mixers import functional
from mixers.backends import torch_retention
from mixers.backends.torch_retention import GROUP, checkpoint_states
from mixers.ops.checks import state_dtype

B, H, Dk, Dv = 1, 2, 5, 7  # sizes no other tensor shares, so a [..., Dk, Dv] tensor is a stack of states
GAMMA = [0.9, 1.0]


class Produced(TorchDispatchMode):
    """Records the shape of every tensor any aten op produces while active."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[torch.Size] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.shapes += [t.shape for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        return out

    def most_states(self, dk: int, dv: int) -> int:
        """The most ``[dk, dv]`` states any one produced tensor holds."""
        return max((math.prod(s[:-2]) // (B * H) for s in self.shapes if tuple(s[-2:]) == (dk, dv)), default=0)

    def largest(self, *, besides: int) -> int:
        """The most elements of any produced tensor, other than those of ``besides`` elements (the output)."""
        return max(math.prod(s) for s in self.shapes if math.prod(s) != besides)


def inputs(T: int, dtype=torch.float32, requires_grad=False):
    gen = torch.Generator().manual_seed(T)
    q = torch.randn(B, T, H, Dk, generator=gen).to(dtype)
    k = (torch.randn(B, T, H, Dk, generator=gen) * Dk**-0.5).to(dtype)
    v = torch.randn(B, T, H, Dv, generator=gen).to(dtype)
    s0 = torch.randn(B, H, Dk, Dv, generator=gen, dtype=state_dtype(dtype))
    return [t.requires_grad_(requires_grad) for t in (q, k, v)] + [s0]


@pytest.mark.parametrize("chunk", [1, 8])
def test_without_gradients_no_intermediate_grows_with_the_sequence(chunk):
    """T = 4 and 16 groups of chunks (plus a tail): the same largest intermediate and at most GROUP states per
    tensor, while the all-chunks-at-once path, which autograd takes, stacks one state per chunk."""
    largest = {}
    for groups in (4, 16):
        T = groups * GROUP * chunk + 3
        q, k, v, s0 = inputs(T)
        with torch.no_grad(), Produced() as seen:
            o, _ = functional.retention(q, k, v, GAMMA, mode="chunkwise", chunk_size=chunk, initial_state=s0)
        assert seen.most_states(Dk, Dv) <= GROUP
        largest[groups] = seen.largest(besides=o.numel())
        with Produced() as seen:
            functional.retention(q.requires_grad_(True), k, v, GAMMA, mode="chunkwise", chunk_size=chunk)
        assert seen.most_states(Dk, Dv) == T // chunk  # (the path the bounded one replaces without gradients)
    assert largest[16] == largest[4], largest


def test_linear_attention_without_gradients_is_bounded_too():
    q, k, v, _ = inputs(20 * GROUP * 4)
    q, k = q.exp(), k.exp()
    with torch.inference_mode(), Produced() as seen:
        functional.linear_attention(q, k, v, mode="chunkwise", chunk_size=4)
    assert 0 < seen.most_states(Dk, Dv + 1) <= GROUP  # kv and the normaliser z travel as one [Dk, Dv + 1] state


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("T", "chunk"), [(1, 4), (37, 4), (GROUP * 4 * 3, 4), (GROUP * 4 * 3 + 5, 4), (500, 7)])
def test_without_gradients_the_results_are_those_of_the_autograd_path(T, chunk, dtype):
    q, k, v, s0 = inputs(T, dtype)
    with torch.no_grad():
        o, s = functional.retention(q, k, v, GAMMA, mode="chunkwise", chunk_size=chunk, initial_state=s0)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    o_ref, s_ref = functional.retention(*leaves, GAMMA, mode="chunkwise", chunk_size=chunk, initial_state=s0)
    assert o.dtype == o_ref.dtype == dtype and o.stride() == o_ref.stride() and s.dtype == s_ref.dtype
    # Exact in float64 and bfloat16 (rounded once at the end); float32 as far as bmm's blocking allows.
    tol = {torch.float64: 0.0, torch.float32: 1e-6, torch.bfloat16: 0.0}[dtype]
    torch.testing.assert_close(o, o_ref.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(s, s_ref.detach(), rtol=tol, atol=tol * 10)


def saved_state_counts(fn) -> list[int]:
    """For each ``[..., Dk, Dv]`` tensor autograd saves while ``fn`` runs, the number of states it holds."""
    counts: list[int] = []

    def pack(t):
        if tuple(t.shape[-2:]) == (Dk, Dv):
            counts.append(math.prod(t.shape[:-2]) // (B * H))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return counts


@pytest.mark.parametrize(("every", "kept"), [(None, 8), (5, 13), (64, 1), (1, 64)])
def test_checkpoint_states_keeps_one_state_every_few_chunks_and_the_same_gradients(every, kept):
    """64 chunks of 4 (and a tail of 3): autograd keeps 64 incoming states (and the tail's one); inside
    ``checkpoint_states(every)`` only ceil(64 / every) (default: about sqrt(64) apart). Gradients w.r.t. q, k,
    v and the initial state are those of the default path, to float64 rounding."""
    T, chunk = 64 * 4 + 3, 4
    q, k, v, s0 = inputs(T, torch.float64, requires_grad=True)
    s0.requires_grad_(True)
    weight = torch.randn(B, T, H, Dv, dtype=torch.float64)
    leaves = [q, k, v, s0]

    def grads():
        o, s = functional.retention(q, k, v, GAMMA, mode="chunkwise", chunk_size=chunk, initial_state=s0)
        return torch.autograd.grad((o * weight).sum() + s.sum(), leaves)

    expected = grads()
    assert sorted(saved_state_counts(grads)) == [1, 64]
    with checkpoint_states(every):
        assert sorted(saved_state_counts(grads)) == sorted([1, kept])
        got = grads()
    for g, w in zip(got, expected, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_checkpoint_states_applies_to_the_forward_calls_inside_it_only():
    q, k, v, _ = inputs(40 * 4, torch.float64, requires_grad=True)
    with checkpoint_states(10):
        o, _ = functional.linear_attention(q.exp(), k.exp(), v, mode="chunkwise", chunk_size=4)
    assert torch_retention._checkpoint_every(40) is None  # off again after the context
    o.sum().backward()  # the backward of a checkpointed forward may run outside the context
    assert torch.isfinite(q.grad).all()
    with pytest.raises(ValueError, match="every must be a positive int"):
        with checkpoint_states(0):
            pass
