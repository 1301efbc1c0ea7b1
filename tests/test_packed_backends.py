"""The torch backends compute packed sequences themselves (``Backend.packs``): one call on a packed row equals the
same backend run once per sequence, and the float64 reference on each sequence.

The backend functions are called directly with a ``mixers.packing.Packing``, in every mode, with and without
gradients: outputs, final states (a row per sequence) and the gradients of q, k, v and the initial state agree,
for sequences shorter and longer than a chunk, chunk sizes that divide no length, empty sequences, a single
sequence, float32 and float64, with and without initial states, rows whose sequences are grouped in several
buckets. A NaN in one sequence leaves every other sequence exactly as it was, outputs and gradients.
``checkpoint_states`` keeps fewer states of a packed row and changes nothing else; KV caches take one row per
sequence, decoding included.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mixers.backends import ragged, torch_linear_attention, torch_retention, torch_softmax_attention
from mixers.ops.checks import MODES, state_dtype
from mixers.ops.linear_attention import LinearState
from mixers.ops.linear_attention.reference import linear_attention_reference
from mixers.ops.retention.reference import retention_reference
from mixers.ops.softmax_attention import KVCache
from mixers.ops.softmax_attention.reference import softmax_attention_reference
from mixers.packing import Packing, join_rows
from mixers.registry import get_registry
from mixers.structure import map_structure, tensors_in
from mixers.testing.strategies import gamma_values, scaled_examples

OPS = ("retention", "linear_attention", "softmax_attention")
H, HKV, DK, DV = 2, 1, 3, 4  # (softmax attention: two query heads share one key head)
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
CPU = torch.device("cpu")


def packing(lengths: list[int]) -> Packing:
    cu = torch.tensor([0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()])
    return Packing.of(cu, sum(lengths), CPU)


def make(op: str, lengths: list[int], dtype: torch.dtype, with_state: bool, seed: int, grad: bool = True):
    """``(q, k, v, initial_state)`` for ``lengths`` packed in one row; leaves require grad if ``grad``."""
    g = torch.Generator().manual_seed(seed)
    T, n = sum(lengths), len(lengths)

    def rand(*shape: int, to: torch.dtype = dtype) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(to)

    sd = state_dtype(dtype)
    if op == "softmax_attention":
        q, k, v = rand(1, T, H, DK), rand(1, T, HKV, DK), rand(1, T, HKV, DV)
        state = None
        if with_state:  # each row holds some tokens, with room for its sequence after them
            held = torch.randint(0, 4, (n,), generator=g)
            capacity = int(held.max()) + max(lengths) + 1
            kept = (torch.arange(capacity) < held[:, None])[:, None, :, None]
            state = KVCache(rand(n, HKV, capacity, DK) * kept, rand(n, HKV, capacity, DV) * kept, held)
    elif op == "linear_attention":  # positive features: normalisers far from zero
        q, k, v = rand(1, T, H, DK).sigmoid(), rand(1, T, H, DK).sigmoid(), rand(1, T, H, DV)
        state = LinearState(rand(n, H, DK, DV, to=sd), rand(n, H, DK, to=sd).abs()) if with_state else None
    else:
        q, k, v = rand(1, T, H, DK), rand(1, T, H, DK), rand(1, T, H, DV)
        state = rand(n, H, DK, DV, to=sd) if with_state else None
    leaves = [q, k, v, *(t for t in tensors_in(state) if t.is_floating_point())]
    for t in leaves:
        t.requires_grad_(grad)
    return q, k, v, state


def call(op: str, q, k, v, mode: str, chunk: int, state, cu_seqlens=None, gamma=(0.9, 0.5)):
    chunk_size = chunk if mode == "chunkwise" else None
    kwargs = {"mode": mode, "chunk_size": chunk_size, "initial_state": state}
    if cu_seqlens is not None:
        kwargs["cu_seqlens"] = cu_seqlens
    if op == "retention":
        return torch_retention.retention(q, k, v, torch.tensor(gamma, dtype=torch.float64), **kwargs)
    if op == "linear_attention":
        return torch_linear_attention.linear_attention(q, k, v, normalize=True, eps=1e-6, **kwargs)
    return torch_softmax_attention.softmax_attention(q, k, v, **kwargs)


def one_by_one(op: str, q, k, v, mode: str, chunk: int, state, lengths: list[int], **kwargs):
    """The backend once per sequence, from that sequence's state row; outputs joined, states joined row-wise."""
    bounds = packing(lengths).bounds
    outs, finals = [], []
    for i, (a, b) in enumerate(zip(bounds, bounds[1:], strict=False)):
        row = map_structure(state, lambda t, i=i: t[i : i + 1])
        o, final = call(op, q[:, a:b], k[:, a:b], v[:, a:b], mode, chunk, row, **kwargs)
        outs.append(o)
        finals.append(final)
    return torch.cat(outs, dim=1), join_rows(finals)


def close(got, want, dtype: torch.dtype, what: str) -> None:
    tol = TOL[dtype]
    scale = max(1.0, float(want.detach().abs().max())) if want.numel() else 1.0
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * scale, msg=what)


def gradients(o, state, leaves, seed: int = 1):
    """Gradients of the leaves for a fixed random weighting of the output and the state's floating tensors."""
    g = torch.Generator().manual_seed(seed)
    parts = [o, *(t for t in tensors_in(state) if t.is_floating_point())]
    loss = sum((t * torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype)).sum() for t in parts)
    return torch.autograd.grad(loss, leaves, allow_unused=True)


def leaves_of(q, k, v, state):
    return [q, k, v, *(t for t in tensors_in(state) if t.is_floating_point())]


def check_against_loop(op, lengths, mode, chunk, dtype, with_state, seed, gamma=(0.9, 0.5)):
    extra = {"gamma": gamma} if op == "retention" else {}
    P = packing(lengths)
    q, k, v, state = make(op, lengths, dtype, with_state, seed)
    o, final = call(op, q, k, v, mode, chunk, state, P, **extra)
    want_o, want_final = one_by_one(op, q, k, v, mode, chunk, state, lengths, **extra)
    assert o.shape == want_o.shape and o.dtype == q.dtype
    close(o, want_o, dtype, "output")
    for i, (a, b) in enumerate(zip(tensors_in(final), tensors_in(want_final), strict=True)):
        assert a.shape == b.shape and a.dtype == b.dtype, f"state[{i}]: {a.shape} {a.dtype} vs {b.shape} {b.dtype}"
        close(a, b, dtype, f"state[{i}]")
    with torch.no_grad():  # the path without gradients (streamed chunks, no autograd function) agrees too
        o_ng, final_ng = call(op, q, k, v, mode, chunk, state, P, **extra)
    close(o_ng, want_o, dtype, "output without gradients")
    for i, (a, b) in enumerate(zip(tensors_in(final_ng), tensors_in(want_final), strict=True)):
        close(a, b, dtype, f"state[{i}] without gradients")
    if sum(lengths) == 0:
        return
    leaves = leaves_of(q, k, v, state)
    got = gradients(o, final, leaves)
    want = gradients(want_o, want_final, leaves)
    for name, a, b in zip(["q", "k", "v", "state", "state.z"], got, want, strict=False):
        assert (a is None) == (b is None), f"d{name}: reached {a is not None}, expected {b is not None}"
        if a is not None:
            close(a, b, dtype, f"d{name}")


@settings(max_examples=scaled_examples(0.8))
@given(
    op=st.sampled_from(OPS),
    lengths=st.lists(st.integers(0, 9), min_size=1, max_size=5),
    mode=st.sampled_from(MODES),
    chunk=st.integers(1, 6),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    with_state=st.booleans(),
    gamma=st.lists(gamma_values, min_size=H, max_size=H),
    seed=st.integers(0, 2**16),
)
def test_one_call_on_a_packed_row_equals_the_backend_once_per_sequence(
    op, lengths, mode, chunk, dtype, with_state, gamma, seed
):
    check_against_loop(op, lengths, mode, chunk, dtype, with_state, seed, tuple(gamma))


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("mode", MODES)
def test_sequences_grouped_in_several_buckets(op, mode):
    """Lengths far apart: parallel mode pads them in several buckets, chunkwise mode chunks the longer ones and
    pads the shorter, recurrent mode advances every sequence token by token."""
    check_against_loop(op, [200, 3, 0, 130, 70, 64, 1, 65], mode, 16, torch.float64, with_state=True, seed=0)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("mode", MODES)
def test_a_single_sequence(op, mode):
    check_against_loop(op, [11], mode, 4, torch.float32, with_state=True, seed=1)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("mode", MODES)
def test_packed_rows_equal_the_float64_reference_on_each_sequence(op, mode):
    lengths, gamma = [5, 0, 9, 1, 4], (0.9, 1e-300)
    P = packing(lengths)
    q, k, v, state = make(op, lengths, torch.float64, True, seed=2)
    o, final = call(op, q, k, v, mode, 3, state, P, **({"gamma": gamma} if op == "retention" else {}))
    leaves = leaves_of(q, k, v, state)
    outs, finals = [], []
    for i, (a, b) in enumerate(zip(P.bounds, P.bounds[1:], strict=False)):
        row = map_structure(state, lambda t, i=i: t[i : i + 1])
        x = (q[:, a:b], k[:, a:b], v[:, a:b])
        if op == "retention":
            ref = retention_reference(*x, torch.tensor(gamma, dtype=torch.float64), row)
        elif op == "linear_attention":
            ref = linear_attention_reference(*x, row)
        else:
            ref = softmax_attention_reference(*x, row)
        outs.append(ref[0])
        finals.append(ref[1])
    want_o = torch.cat(outs, dim=1)
    close(o, want_o, torch.float64, "output")
    if op == "softmax_attention":  # the reference gives each row's tokens, then zeros (KVCache.held)
        final, want_final = final.held(), KVCache.cat([KVCache(*f) for f in finals]).held()
    else:
        want_final = join_rows(finals)
    for i, (a, b) in enumerate(zip(tensors_in(final), tensors_in(want_final), strict=True)):
        close(a, b, torch.float64, f"state[{i}]")
    weight = torch.randn(o.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = torch.autograd.grad((o * weight).sum(), leaves, allow_unused=True)
    want = torch.autograd.grad((want_o * weight).sum(), leaves, allow_unused=True)
    for name, a, b in zip(["q", "k", "v", "state", "state.z"], got, want, strict=False):
        if b is not None:
            close(a, b, torch.float64, f"d{name}")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_a_nan_in_one_sequence_leaves_the_others_exactly_as_they_were(op, mode, where):
    """Sequence 1 gets a NaN at its fourth token: every other sequence's outputs, states and gradients, and its
    own outputs and gradients before the NaN, are exactly those of the clean row; its outputs from the NaN on are
    not finite. With and without gradients."""
    lengths, bad = [6, 9, 0, 7], 1
    P = packing(lengths)
    start = P.bounds[bad]
    t = start + 3
    keep = torch.ones(sum(lengths), dtype=torch.bool)
    keep[t : P.bounds[bad + 1]] = False  # what the NaN may reach: its sequence from its position on
    rows = [i for i in range(len(lengths)) if i != bad]
    for grad in (True, False):
        clean = make(op, lengths, torch.float32, True, seed=4, grad=grad)
        dirty = make(op, lengths, torch.float32, True, seed=4, grad=grad)
        with torch.no_grad():
            {"q": dirty[0], "k": dirty[1], "v": dirty[2]}[where][0, t, -1, 0] = math.nan
        with torch.set_grad_enabled(grad):
            o_clean, s_clean = call(op, *clean[:3], mode, 4, clean[3], P)
            o_dirty, s_dirty = call(op, *dirty[:3], mode, 4, dirty[3], P)
        assert torch.equal(o_dirty[0, keep], o_clean[0, keep]), f"outputs away from the NaN changed (grad={grad})"
        assert not o_dirty[0, t:][~keep[t:]].isfinite().all(), "the NaN reached no output after it"
        for i, (a, b) in enumerate(zip(tensors_in(s_dirty), tensors_in(s_clean), strict=True)):
            assert torch.equal(a[rows], b[rows]), f"state[{i}] of another sequence changed (grad={grad})"
        if not grad:
            continue
        weight = torch.randn(int(keep.sum()), H, DV, generator=torch.Generator().manual_seed(5))
        got = torch.autograd.grad((o_dirty[0, keep] * weight).sum(), leaves_of(*dirty), allow_unused=True)
        want = torch.autograd.grad((o_clean[0, keep] * weight).sum(), leaves_of(*clean), allow_unused=True)
        for name, a, b in zip(["q", "k", "v", "state", "state.z"], got, want, strict=False):
            assert torch.equal(a, b), f"d{name} changed where the NaN cannot reach"


@pytest.mark.parametrize("chunk", [None, 3])
def test_the_buckets_gather_and_scatter_heads_are_exact_and_so_are_their_gradients(chunk):
    """``Buckets.gather_heads`` and ``scatter_heads`` on a row of several buckets with empty slots (which reread
    their chunk's last token) and an empty sequence: scattering the gathered chunks gives the row back, each
    layout's chunks hold its sequences' tokens, and both backwards pass ``gradcheck``; also from a strided view
    (read in place) and in another dtype (the gradient comes back in the input's)."""
    P = packing([5, 0, 1, 7, 2, 3])
    groups = ragged.buckets(P, chunk)
    assert len(groups.layouts) > 1 or chunk is None
    base = torch.randn(1, P.total, 2, H, 3, dtype=torch.float64, requires_grad=True)
    x = base[:, :, 1]  # (token, head) rows of 3, two heads apart
    parts = groups.gather_heads(x)
    for part, layout in zip(parts, groups.layouts, strict=True):
        assert part.shape == (1, H, layout.chunks, layout.C, 3) and part.is_contiguous()
        assert torch.equal(part[0].flatten(1, 2), x[0, layout.index].transpose(0, 1))
    assert torch.equal(groups.scatter_heads(parts), x[0])
    assert torch.autograd.gradcheck(lambda b: groups.gather_heads(b[:, :, 1]), (base,))
    leaves = tuple(p.detach().requires_grad_() for p in parts)
    assert torch.autograd.gradcheck(lambda *ps: groups.scatter_heads(ps), leaves)
    low = x.detach().float().requires_grad_()
    assert all(p.dtype == torch.float64 for p in groups.gather_heads(low, torch.float64))
    (grad,) = torch.autograd.grad(groups.scatter_heads(groups.gather_heads(low, torch.float64)).sum(), low)
    assert grad.dtype == torch.float32 and torch.equal(grad, torch.ones_like(low))


@pytest.mark.parametrize("op", ["retention", "linear_attention"])
def test_checkpointed_states_keep_fewer_states_and_change_nothing(op):
    """Inside ``checkpoint_states`` the packed chunkwise backward keeps every ``every``-th state of each sequence
    and recomputes the others: less saved for the backward, the same results."""
    lengths, chunk = [64, 5, 0, 40, 33], 2
    P = packing(lengths)

    def run(context):
        q, k, v, state = make(op, lengths, torch.float64, True, seed=6)
        saved = []

        def keep(t):
            saved.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), context:
            o, final = call(op, q, k, v, "chunkwise", chunk, state, P)
        return o, final, gradients(o, final, leaves_of(q, k, v, state)), sum(saved)

    o, final, grads, kept_all = run(contextlib.nullcontext())
    for every in (None, 4):  # (None: about sqrt(32) chunks apart, for the 32 chunks of the longest sequence)
        o2, final2, grads2, kept = run(torch_retention.checkpoint_states(every))
        assert kept < kept_all, f"every={every} saved {kept} elements, not fewer than {kept_all}"
        torch.testing.assert_close(o2, o, rtol=1e-12, atol=1e-12)
        for a, b in zip(tensors_in(final2) + list(grads2), tensors_in(final) + list(grads), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_decoding_packed_rows_from_a_cache(mode):
    """One new token per sequence (every sequence at its own position in its cache row), then a few more."""
    for lengths in ([1, 1, 1, 1], [3, 1, 2, 0]):
        check_against_loop("softmax_attention", lengths, mode, 2, torch.float64, with_state=True, seed=7)


@pytest.mark.parametrize("op", ["retention", "linear_attention"])
@pytest.mark.parametrize("mode", MODES)
def test_low_precision_inputs_accumulate_in_float32(op, mode):
    lengths = [7, 0, 12, 3]
    P = packing(lengths)
    q, k, v, state = make(op, lengths, torch.bfloat16, True, seed=8, grad=False)
    o, final = call(op, q, k, v, mode, 4, state, P)
    want_o, want_final = one_by_one(op, q, k, v, mode, 4, state, lengths)
    assert o.dtype == torch.bfloat16 and all(t.dtype == torch.float32 for t in tensors_in(final))
    torch.testing.assert_close(o, want_o, rtol=1e-2, atol=1e-2)
    for a, b in zip(tensors_in(final), tensors_in(want_final), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", OPS)
def test_the_torch_backends_declare_that_they_pack(op):
    assert get_registry().backends[op]["torch"].packs
