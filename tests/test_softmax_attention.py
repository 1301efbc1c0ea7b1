"""Softmax attention: the op against two float64 references (the per-token formula, and the plain
``softmax(QK^T / sqrt(d) + causal mask) V``), grouped-query heads, the KV cache's validation, the
chunkwise backward's memory, and the mixer's rotary positions across a hand-over.

The generic properties every mixer shares (modes agree, split hand-over, causality, bad input) live in
the conformance suite; here are the properties specific to softmax attention.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import mixers
from mixers import functional
from mixers.ops.softmax_attention.reference import softmax_attention_reference
from mixers.softmax_attention import SoftmaxAttention

MODES = functional.MODES
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 2e-5)}  # (rtol, atol) against float64


def formula_reference(q, k, v, k_cache=None, v_cache=None):
    """The kit's per-token formula (``mixers.testing.reference``): the outputs only, in float64.

    ``o_t = sum_{s<=Tc+t} exp(q_t . k_s / sqrt(d)) v_s / sum_{s<=Tc+t} exp(q_t . k_s / sqrt(d))``, a loop over
    query tokens and heads; query head h reads key head ``h // (H / Hkv)``.
    """
    return softmax_attention_reference(q, k, v, None if k_cache is None else (k_cache, v_cache))[0]


def matrix_reference(q, k, v, k_cache=None, v_cache=None):
    """``softmax(Q K^T / sqrt(d) + M) V`` with ``M`` = 0 on and below the (cache-shifted) diagonal, -inf above.
    The caches are head-major, ``[B, Hkv, Tc, D]``."""
    q, k, v = q.double(), k.double(), v.double()
    if k_cache is not None:
        k = torch.cat([k_cache.double().transpose(1, 2), k], dim=1)
        v = torch.cat([v_cache.double().transpose(1, 2), v], dim=1)
    T, H, L = q.shape[1], q.shape[2], k.shape[1]
    G = H // k.shape[2]
    k, v = k.repeat_interleave(G, dim=2), v.repeat_interleave(G, dim=2)
    allowed = torch.arange(L)[None, :] <= (L - T) + torch.arange(T)[:, None]
    M = torch.zeros(T, L, dtype=torch.float64).masked_fill(~allowed, -math.inf)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(q.shape[-1]) + M
    return torch.einsum("bhts,bshe->bthe", torch.softmax(scores, dim=-1), v)


@st.composite
def problems(draw, dtypes=(torch.float32, torch.float64)):
    """Shapes (grouped heads included), a cache, modes, a split with state hand-over, inputs from a seed."""
    B, T, Tc = draw(st.integers(1, 2)), draw(st.integers(0, 16)), draw(st.integers(0, 8))
    Hkv, G = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    Dk, Dv = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    dtype = draw(st.sampled_from(dtypes))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    cache = (randn(B, Hkv, Tc, Dk), randn(B, Hkv, Tc, Dv)) if draw(st.booleans()) else None  # head-major
    return dict(
        q=randn(B, T, Hkv * G, Dk),
        k=randn(B, T, Hkv, Dk),
        v=randn(B, T, Hkv, Dv),
        cache=cache,
        split=draw(st.integers(0, T)),
        modes=(draw(st.sampled_from(MODES)), draw(st.sampled_from(MODES))),
        chunks=(draw(st.integers(1, 20)), draw(st.integers(1, 20))),
    )


@given(problems())
def test_op_matches_both_references_across_modes_and_a_split(p):
    q, k, v, t = p["q"], p["k"], p["v"], p["split"]
    o1, c1 = functional.softmax_attention(
        q[:, :t], k[:, :t], v[:, :t], mode=p["modes"][0], chunk_size=p["chunks"][0], initial_state=p["cache"]
    )
    o2, c2 = functional.softmax_attention(
        q[:, t:], k[:, t:], v[:, t:], mode=p["modes"][1], chunk_size=p["chunks"][1], initial_state=c1
    )
    o = torch.cat([o1, o2], dim=1)
    cache = p["cache"] or (None, None)
    rtol, atol = TOL[q.dtype]
    assert o.dtype == q.dtype and o.shape == (*q.shape[:3], v.shape[-1])
    torch.testing.assert_close(o.double(), formula_reference(q, k, v, *cache), rtol=rtol, atol=atol)
    torch.testing.assert_close(o.double(), matrix_reference(q, k, v, *cache), rtol=rtol, atol=atol)
    # the cache holds every key and value so far, exactly, in the input dtype (and may have free slots after them)
    assert isinstance(c2, functional.KVCache) and c2.k.dtype == q.dtype
    want_k = k.transpose(1, 2) if cache[0] is None else torch.cat([cache[0], k.transpose(1, 2)], dim=2)
    want_v = v.transpose(1, 2) if cache[1] is None else torch.cat([cache[1], v.transpose(1, 2)], dim=2)
    held = c2.held()
    assert torch.equal(held.k, want_k) and torch.equal(held.v, want_v)
    assert c2.length.tolist() == [want_k.shape[2]] * want_k.shape[0]


@pytest.mark.parametrize("mode,chunk", [("parallel", None), ("chunkwise", 1), ("chunkwise", 4), ("recurrent", None)])
@pytest.mark.parametrize("groups", [1, 3])
def test_op_gradients_match_reference(mode, chunk, groups):
    """Gradients reach q, k, v and the cache (the keys of earlier calls), as the reference says."""
    gen = torch.Generator().manual_seed(3)
    B, T, Tc, Hkv, D = 2, 9, 5, 2, 4

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()

    inputs = [randn(B, T, Hkv * groups, D), randn(B, T, Hkv, D), randn(B, T, Hkv, 3), randn(B, Hkv, Tc, D)]
    inputs.append(randn(B, Hkv, Tc, 3))
    w = torch.randn(B, T, Hkv * groups, 3, generator=gen, dtype=torch.float64)
    q, k, v, kc, vc = inputs
    o, _ = functional.softmax_attention(q, k, v, mode=mode, chunk_size=chunk, initial_state=(kc, vc))
    got = torch.autograd.grad((w * o).sum(), inputs)
    want = torch.autograd.grad((w * matrix_reference(*inputs)).sum(), inputs)
    for name, g, ref in zip(("q", "k", "v", "k_cache", "v_cache"), got, want, strict=True):
        torch.testing.assert_close(g, ref, rtol=1e-10, atol=1e-10, msg=lambda m, n=name: f"d/d{n}: {m}")


@given(
    T=st.integers(1, 7), Tc=st.integers(0, 5), chunk=st.integers(1, 8), groups=st.integers(1, 2),
    seed=st.integers(0, 2**31 - 1),
)  # fmt: skip
def test_chunkwise_backward_passes_gradcheck(T, Tc, chunk, groups, seed):
    """The hand-written backward of the blockwise kernel against finite differences."""
    gen = torch.Generator().manual_seed(seed)
    kc, vc = torch.randn(1, 1, Tc, 3, generator=gen).double(), torch.randn(1, 1, Tc, 2, generator=gen).double()
    q = torch.randn(1, T, groups, 3, generator=gen).double().requires_grad_()
    k = torch.randn(1, T, 1, 3, generator=gen).double().requires_grad_()
    v = torch.randn(1, T, 1, 2, generator=gen).double().requires_grad_()

    def fn(q, k, v):
        return functional.softmax_attention(q, k, v, mode="chunkwise", chunk_size=chunk, initial_state=(kc, vc))[0]

    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("mode", MODES)
def test_large_scores_do_not_overflow(mode):
    """Scores near 1e4: the online softmax's running max keeps exp in range in every mode."""
    gen = torch.Generator().manual_seed(4)
    q, k = (torch.randn(1, 24, 2, 8, generator=gen) * 40 for _ in range(2))
    v = torch.randn(1, 24, 2, 8, generator=gen)
    o, _ = functional.softmax_attention(q, k, v, mode=mode, chunk_size=5)
    assert torch.isfinite(o).all()
    torch.testing.assert_close(o.double(), matrix_reference(q, k, v), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", MODES)
def test_op_bfloat16_is_close_to_reference(mode):
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 40, 2, 8, generator=gen).bfloat16() for _ in range(3))
    o, cache = functional.softmax_attention(q, k, v, mode=mode, chunk_size=16)
    assert o.dtype == cache.k.dtype == torch.bfloat16
    ref = matrix_reference(q, k, v)
    assert (o.double() - ref).norm() / ref.norm() < 1.6e-2  # relative RMS error


def test_chunkwise_training_memory_is_linear_in_T():
    """Autograd keeps O(T * chunk) for the blockwise kernel, not the O(T^2) of the attention matrix."""
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    T, C = 1024, 32
    q, k, v = (torch.randn(1, T, 1, 8, requires_grad=True) for _ in range(3))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        o, _ = functional.softmax_attention(q, k, v, mode="chunkwise", chunk_size=C)
    assert sum(saved) < 16 * T * 8  # q, k, v, o and the log-sum-exp, a few T * D each; T^2 would be 1M
    o.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


# -- validation of the KV cache and the grouped heads -----------------------------------------------


def _qkv(B=2, T=3, H=4, Hkv=2, Dk=8, Dv=6):
    return torch.randn(B, T, H, Dk), torch.randn(B, T, Hkv, Dk), torch.randn(B, T, Hkv, Dv)


@pytest.mark.parametrize(
    "cache,error,match",
    [
        (torch.zeros(2, 2, 5, 8), TypeError, r"initial_state must be None, a KVCache\(k \[B, Hkv, C, Dk\], v"),
        ((torch.zeros(3, 2, 5, 8), torch.zeros(3, 2, 5, 6)), ValueError,
         r"initial_state.k \(the key cache\) was built for batch size 3, but q has batch size 2"),
        ((torch.zeros(2, 4, 5, 8), torch.zeros(2, 4, 5, 6)), ValueError,
         r"initial_state.k \(the key cache\) holds 4 heads, but k and v have 2 heads"),
        ((torch.zeros(2, 2, 5, 8), torch.zeros(2, 1, 5, 6)), ValueError,
         r"initial_state.v \(the value cache\) holds 1 heads, but k and v have 2 heads"),
        ((torch.zeros(2, 2, 5, 4), torch.zeros(2, 2, 5, 6)), ValueError,
         r"initial_state.k \(the key cache\) has head dim 4, but k has head dim 8"),
        ((torch.zeros(2, 2, 5, 8), torch.zeros(2, 2, 4, 6)), ValueError,
         "k and v caches must hold as many tokens, got 5 and 4"),
        ((torch.zeros(2, 2, 5, 8).double(), torch.zeros(2, 2, 5, 6)), TypeError,
         "must have the dtype of q, torch.float32, got torch.float64"),
        ((torch.zeros(2, 5, 16), torch.zeros(2, 2, 5, 6)), ValueError, r"must have rank 4 \[B, Hkv, C, KD\]"),
        ((torch.zeros(2, 2, 5, 8), "cache"), TypeError, r"initial_state.v \(the value cache\) must be a torch.Tensor"),
    ],
)  # fmt: skip
def test_a_foreign_kv_cache_is_rejected_clearly(cache, error, match):
    q, k, v = _qkv()
    for mode in MODES:
        with pytest.raises(error, match=match):
            functional.softmax_attention(q, k, v, mode=mode, initial_state=cache)


def test_a_cache_from_another_batch_size_is_rejected_after_a_real_call():
    q, k, v = _qkv(B=3)
    _, cache = functional.softmax_attention(q, k, v, mode="parallel")
    q, k, v = _qkv(B=2)
    with pytest.raises(ValueError, match="was built for batch size 3, but q has batch size 2"):
        functional.softmax_attention(q, k, v, mode="recurrent", initial_state=cache)


@pytest.mark.parametrize(
    "shapes,match",
    [
        (
            ((2, 3, 4, 8), (2, 3, 3, 8), (2, 3, 3, 6)),
            "k must have a number of heads Hkv dividing the H = 4 heads of q, got Hkv = 3",
        ),
        (((2, 3, 4, 8), (2, 3, 2, 4), (2, 3, 2, 6)), r"k must be \[B, T, Hkv, Dk\] with B, T, Dk = 2, 3, 8 as in q"),
        (((2, 3, 4, 8), (2, 3, 2, 8), (2, 3, 1, 6)), r"v must be \[B, T, Hkv, Dv\] with B, T, Hkv = \(2, 3, 2\)"),
    ],
)
def test_bad_grouped_heads_are_rejected_clearly(shapes, match):
    q, k, v = (torch.zeros(s) for s in shapes)
    with pytest.raises(ValueError, match=match):
        functional.softmax_attention(q, k, v, mode="parallel")


# -- the mixer --------------------------------------------------------------------------------------


def test_mixer_without_rotation_computes_the_formula():
    torch.manual_seed(0)
    mixer = SoftmaxAttention(12, num_heads=3, num_kv_heads=1, rotary=False).double()
    x = torch.randn(2, 7, 12, dtype=torch.float64)
    q, k, v = (x @ W.T for W in mixer.in_proj.weight.split(mixer.widths, dim=0))
    o = formula_reference(q.view(2, 7, 3, 4), k.view(2, 7, 1, 4), v.view(2, 7, 1, 4))
    y, state = mixer(x)
    torch.testing.assert_close(y, o.reshape(2, 7, 12) @ mixer.out_proj.weight.T, rtol=1e-10, atol=1e-10)
    assert state.offset == 7 and state.op.k.shape == (2, 1, 7, 4) and state.op.length.tolist() == [7, 7]


def test_rotary_positions_continue_across_a_hand_over():
    """A split with hand-over equals one pass, and it is the offset that makes it so: restarting positions
    at 0 for the second part (cache kept) changes the output."""
    torch.manual_seed(0)
    mixer = SoftmaxAttention(16, num_heads=2).double()
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    y, _ = mixer(x)
    y1, s1 = mixer(x[:, :5], mode="chunkwise", chunk_size=2)
    y2, s2 = mixer(x[:, 5:], s1, mode="recurrent")
    torch.testing.assert_close(torch.cat([y1, y2], dim=1), y, rtol=1e-10, atol=1e-10)
    assert s2.offset == 12 and s2.op.length.tolist() == [12, 12]
    y2_restarted, _ = mixer(x[:, 5:], dataclasses.replace(s1, pos=torch.zeros_like(s1.pos)), mode="recurrent")
    assert (y2_restarted - y2).abs().max() > 1e-3


def test_rotary_attention_depends_on_relative_positions_only():
    """Starting the whole sequence at position 1000 (empty cache) changes nothing: RoPE scores are relative."""
    torch.manual_seed(0)
    mixer = SoftmaxAttention(16, num_heads=2).double()
    x = torch.randn(1, 9, 16, dtype=torch.float64)
    y, _ = mixer(x)
    shifted = dataclasses.replace(mixer.init_state(1, dtype=torch.float64), pos=torch.tensor([1000]))
    y_shifted, state = mixer(x, shifted, mode="chunkwise", chunk_size=4)
    torch.testing.assert_close(y_shifted, y, rtol=1e-9, atol=1e-9)
    assert state.offset == 1009


@pytest.mark.parametrize("num_kv_heads", [1, 2])
def test_grouped_query_mixer_equals_multi_head_with_shared_key_heads(num_kv_heads):
    """GQA = multi-head attention whose key/value projections repeat each shared head; its cache is smaller."""
    torch.manual_seed(0)
    H, D = 4, 4
    gqa = SoftmaxAttention(16, num_heads=H, num_kv_heads=num_kv_heads).double()
    mha = SoftmaxAttention(16, num_heads=H).double()
    Wq, Wk, Wv = gqa.in_proj.weight.split(gqa.widths, dim=0)

    def repeat(W):  # (Hkv * D, d) -> (H * D, d), each key head copied to its G query heads
        return W.view(num_kv_heads, D, 16).repeat_interleave(H // num_kv_heads, dim=0).reshape(H * D, 16)

    with torch.no_grad():
        mha.in_proj.weight.copy_(torch.cat([Wq, repeat(Wk), repeat(Wv)]))
        mha.out_proj.weight.copy_(gqa.out_proj.weight)
    x = torch.randn(2, 10, 16, dtype=torch.float64)
    y_gqa, s_gqa = gqa(x, mode="chunkwise", chunk_size=3)
    y_mha, s_mha = mha(x)
    torch.testing.assert_close(y_gqa, y_mha, rtol=1e-10, atol=1e-10)
    assert s_gqa.op.k.shape == (2, num_kv_heads, 10, D)
    assert s_gqa.op.k.nbytes * (H // num_kv_heads) == s_mha.op.k.nbytes


def test_the_cache_grows_when_the_tokens_do_not_fit():
    """Without preallocation the cache grows to what is needed, at least doubling, so a token-by-token loop
    reallocates O(log n) times, not at every token."""
    mixer = SoftmaxAttention(16, num_heads=4, num_kv_heads=2)
    state = mixer.init_state(3)
    assert state.op.k.shape == (3, 2, 0, 4)
    capacities = []
    for n in (1, 7, 1, 1, 1):
        _, state = mixer(torch.randn(3, n, 16), state, mode="recurrent")
        capacities.append(state.op.k.shape[2])
    assert capacities == [1, 8, 16, 16, 16]
    assert state.offset == 11 and state.op.length.tolist() == [11] * 3
    # k and v (B * C * Hkv * D * 4 bytes each), the lengths and the positions (B * 8 bytes each)
    assert state.nbytes == 2 * 3 * 16 * 2 * 4 * 4 + 2 * 3 * 8


def test_a_preallocated_cache_is_written_in_place_and_equals_one_pass():
    """``init_state(B, max_len=C)`` is the static decode path: the same buffers at every step (written in place
    when no gradient is recorded), and the outputs of one pass."""
    torch.manual_seed(0)
    mixer = SoftmaxAttention(16, num_heads=4, num_kv_heads=2).double()
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    y, _ = mixer(x)
    state = mixer.init_state(2, dtype=torch.float64, max_len=12)
    buffer = state.op.k.data_ptr()
    outs = []
    with torch.no_grad():
        y_prefix, state = mixer(x[:, :4], state, mode="chunkwise", chunk_size=3)
        outs.append(y_prefix)
        for t in range(4, 9):
            y_t, state = mixer(x[:, t : t + 1], state, mode="recurrent")
            outs.append(y_t)
    torch.testing.assert_close(torch.cat(outs, dim=1), y, rtol=1e-10, atol=1e-10)
    assert state.op.k.data_ptr() == buffer and state.op.k.shape == (2, 2, 12, 4)
    assert state.op.length.tolist() == [9, 9] and state.pos.tolist() == [9, 9]


def test_rows_at_different_positions_equal_each_row_on_its_own():
    """Per-row positions: a batch whose rows hold different numbers of tokens gives each row what it gives
    alone (its own rotation positions and its own cache length), in every mode."""
    torch.manual_seed(0)
    mixer = SoftmaxAttention(16, num_heads=2).double()
    x = torch.randn(2, 10, 16, dtype=torch.float64)
    cuts = [3, 6]
    rows = []
    for b, cut in enumerate(cuts):  # each row alone: a prefix, then 4 more tokens
        _, s = mixer(x[b : b + 1, :cut], mixer.init_state(1, dtype=torch.float64, max_len=12))
        y_b, _ = mixer(x[b : b + 1, cut : cut + 4], s)
        rows.append((s, y_b))
    batched = dataclasses.replace(
        rows[0][0],
        pos=torch.cat([s.pos for s, _ in rows]),
        op=functional.KVCache(*(torch.cat([getattr(s.op, f) for s, _ in rows]) for f in ("k", "v", "length"))),
    )
    x_next = torch.stack([x[b, cut : cut + 4] for b, cut in enumerate(cuts)])
    for mode in ("parallel", "chunkwise", "recurrent"):
        y, after = mixer(x_next, batched, mode=mode, chunk_size=3)
        torch.testing.assert_close(y, torch.cat([y_b for _, y_b in rows]), rtol=1e-10, atol=1e-10)
        assert after.pos.tolist() == [7, 10] and after.op.length.tolist() == [7, 10]


def test_reordering_the_cache_follows_the_batch():
    """Beam search: reordering the state equals running the reordered batch."""
    torch.manual_seed(0)
    mixer = SoftmaxAttention(8, num_heads=2).double()
    x = torch.randn(3, 6, 8, dtype=torch.float64)
    index = torch.tensor([2, 2, 0])
    _, s = mixer(x[:, :4])
    y, _ = mixer(x[index, 4:], s.reorder(index), mode="recurrent")
    _, s_ref = mixer(x[index, :4])
    y_ref, _ = mixer(x[index, 4:], s_ref, mode="recurrent")
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_heads=4, num_kv_heads=3), "num_kv_heads must be a positive divisor of num_heads=4, got 3"),
        (dict(num_heads=4, num_kv_heads=0), "num_kv_heads must be a positive divisor of num_heads=4, got 0"),
        (dict(head_dim=3), "rotation needs an even head dimension, got 3"),
        (dict(rope_layout="spiral"), "rope_layout must be one of"),
        (dict(chunk_size=0), "chunk_size must be >= 1"),
    ],
)
def test_mixer_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SoftmaxAttention(12 if kwargs.get("head_dim") == 3 else 16, **kwargs)


def test_mixer_rejects_a_state_from_another_mixer_or_batch():
    mixer = mixers.build("softmax_attention", 8, num_heads=2)
    x = torch.randn(2, 3, 8)
    with pytest.raises(TypeError, match="state.op must be a KVCache"):
        mixer(x, mixers.build("retention", 8, num_heads=2).init_state(2))
    with pytest.raises(ValueError, match="is for batch size 1, but x has batch size 2"):
        mixer(x, mixer.init_state(1))
    other = mixers.build("softmax_attention", 8, num_heads=2, num_kv_heads=1)
    with pytest.raises(ValueError, match="holds 1 heads, but k and v have 2 heads"):
        mixer(x, other.init_state(2))
    assert isinstance(mixer.init_state(2).op, functional.KVCache)
