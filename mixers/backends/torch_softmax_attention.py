"""Causal softmax attention in pure torch, continuing from a KV cache.

- parallel: ``torch.nn.functional.scaled_dot_product_attention`` (its fused CPU/GPU kernels), with an
  explicit bottom-right causal mask when a cache precedes the new tokens.
- chunkwise: blockwise attention over key blocks of ``chunk_size`` with an online softmax (running
  max, running sum), as in FlashAttention-2. It is an ``autograd.Function`` whose backward
  recomputes each block's probabilities from the saved log-sum-exp instead of keeping them, so the
  training memory is ``O(T * chunk_size)`` rather than the ``O(T^2)`` that autograd through the
  loop would save.
- recurrent: token by token, each query against the cache up to and including its own token.

With a cache, the new keys and values are written after each row's ``length`` tokens (in place when no
gradient is recorded), and every mode attends over the cache's whole capacity with a per-row mask: rows may
hold different numbers of tokens, and a preallocated cache keeps every shape fixed for a compiled decode step.
Free slots are zeros (``init_state`` and growth make them so) and masked out.

Grouped-query attention is computed without copying keys: the ``G = H / Hkv`` query heads that share a
key head are folded into the query rows (``[B, Hkv, T * G, Dk]``; row ``r`` is token ``r // G``).
Chunkwise and recurrent run in float32 (float64 for float64 inputs); the cache keeps the input dtype.

Causality with non-finite inputs. Parallel and chunkwise weigh a whole block of values by probabilities that
are exactly 0 for later keys, and ``0 * NaN`` is NaN; SDPA with an explicit mask even adds ``-inf`` to a
later key's NaN score; every backward meets a later NaN with a zero gradient. So every mode computes on the
finite parts of the new queries, keys and values, and marks NaN where the non-finite entries reach
(``mixers.backends.nonfinite``): a NaN or inf at position t leaves every output before t, and the gradients
of every input before t, as they were, and makes the outputs from t on non-finite. The cache, which every
new query sees whole, and the returned cache keep the values as given. (On the CPU, new tokens that are all
finite skip this: it would change nothing; so does a single new token, which nothing earlier sees.)

Packed sequences (``cu_seqlens``, a ``mixers.packing.Packing``; registered with ``packs=True``): q, k, v ``[1, T,
H, D]`` hold ``n`` sequences back to back; ``initial_state`` is None or a cache with a row per sequence (with
room for its tokens after its ``length``), and the cache returned has a row per sequence (without a cache, the
longest sequence's capacity, zeros after each row's tokens). No token attends across a boundary, and nothing
loops over sequences (``_packed``). Chunkwise mode without a cache runs the blockwise pass on the packed row
itself: each key block visits only the rows of the sequences it holds, and masks the keys of other sequences,
so nothing is padded. The other modes, and every mode with a cache, run padded batches, a row per sequence,
sequences of similar lengths together (``mixers.backends.ragged.buckets``): per bucket one
``scaled_dot_product_attention`` with ``is_causal`` in parallel mode, one loop over its longest sequence's tokens
in recurrent mode. The slots after a sequence's tokens repeat its last token, which causal attention hides from
every real token, and their outputs are dropped. With a cache, each sequence's tokens are written after its
row's ``length`` and attend under the per-row mask. The non-finite marks stay within each sequence.
"""

from __future__ import annotations

import bisect
import math
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor
from torch.autograd.function import once_differentiable

from mixers.backends import nonfinite
from mixers.backends.ragged import Ragged, buckets
from mixers.catalogue import Backend, BackendRegistrar
from mixers.hookspecs import hookimpl
from mixers.ops.checks import state_dtype
from mixers.ops.softmax_attention import KVCache

if TYPE_CHECKING:  # pragma: no cover
    from mixers.packing import Packing


class _Packed(NamedTuple):
    """Packed sequences in one row, for the blockwise pass: each token's sequence, and for each key block the end
    of the last sequence it holds (the rows after it share no sequence with the block)."""

    seq: Tensor  # int64 [T]
    ends: tuple[int, ...]


def _visible(
    a: int, b: int, offset: int | Tensor, r0: int, R: int, group: int, device: torch.device, seq: Tensor | None = None
) -> Tensor | None:
    """Mask of keys ``a..b-1`` that rows ``r0..R-1`` may see (row r at ``offset + r // group``; with ``seq``, only
    keys of its own sequence), or ``None`` if they see all: ``[R - r0, b - a]`` for an int offset, ``[B, 1,
    R - r0, b - a]`` for per-row offsets ``[B]``."""
    rows = torch.arange(r0, R, device=device) // group
    if isinstance(offset, Tensor):
        pos = offset[:, None, None] + rows[None, :, None]  # (B, R - r0, 1)
        return (torch.arange(a, b, device=device) <= pos)[:, None]
    keys = torch.arange(a, b, device=device)
    if seq is not None:
        return (keys[None, :] <= rows[:, None]) & (seq[keys][None, :] == seq[rows][:, None])
    if b - 1 <= offset + r0 // group:  # the block ends at or before the earliest row's position
        return None
    return keys[None, :] <= (offset + rows)[:, None]


def _row_range(a: int, offset: int | Tensor, group: int, R: int, block: int, packed: _Packed | None) -> tuple[int, int]:
    """The rows that may see key block ``a``: rows before the first sit before key ``a`` (none for per-row
    offsets); with packed sequences, rows after the last are of later sequences only."""
    r0 = 0 if isinstance(offset, Tensor) else max(0, a - offset) * group
    return r0, (R if packed is None else packed.ends[a // block] * group)


class _BlockwiseAttention(torch.autograd.Function):
    """``q [B, Hkv, R, Dk]`` (row r at position ``offset + r // group``; ``offset`` an int or per batch row
    ``[B]``) against ``k, v [B, Hkv, L, D]``. With ``packed`` (``B = 1``, ``offset = 0``, packed sequences), a row
    sees only keys of its own sequence, and each key block visits only the rows of the sequences it holds."""

    @staticmethod
    def forward(
        ctx,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        offset: int | Tensor,
        group: int,
        block: int,
        scale: float,
        packed: _Packed | None = None,
    ) -> Tensor:  # type: ignore[override]
        R, L = q.shape[2], k.shape[2]
        seq = None if packed is None else packed.seq
        m = q.new_full(q.shape[:3], -math.inf)  # running max of the scores, (B, Hkv, R)
        total = q.new_zeros(q.shape[:3])  # running sum of exp(score - m)
        acc = q.new_zeros(*q.shape[:3], v.shape[-1])  # running sum of exp(score - m) v
        for a in range(0, L, block):
            b = min(a + block, L)
            r0, r1 = _row_range(a, offset, group, R, block, packed)  # the rows that may see this block
            s = q[:, :, r0:r1] @ k[:, :, a:b].transpose(-1, -2) * scale  # (B, Hkv, r1 - r0, b - a)
            visible = _visible(a, b, offset, r0, r1, group, q.device, seq)
            if visible is not None:
                s = s.masked_fill(~visible, -math.inf)
            # A row first visited sees a key of the block (key 0, or its sequence's first key): m_new is finite.
            m_new = torch.maximum(m[:, :, r0:r1], s.amax(dim=-1))
            p = torch.exp(s - m_new[..., None])
            alpha = torch.exp(m[:, :, r0:r1] - m_new)  # rescales what was summed under the old max
            total[:, :, r0:r1] = alpha * total[:, :, r0:r1] + p.sum(dim=-1)
            acc[:, :, r0:r1] = alpha[..., None] * acc[:, :, r0:r1] + p @ v[:, :, a:b]
            m[:, :, r0:r1] = m_new
        o = acc / total[..., None]  # every row sees at least its own key, so total >= 1
        if isinstance(offset, Tensor):
            ctx.save_for_backward(q, k, v, o, m + total.log(), offset)
            ctx.args = (None, group, block, scale, packed)
        else:
            ctx.save_for_backward(q, k, v, o, m + total.log())
            ctx.args = (offset, group, block, scale, packed)
        return o

    @staticmethod
    @once_differentiable
    def backward(ctx, do: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        q, k, v, o, lse, *per_row = ctx.saved_tensors
        offset, group, block, scale, packed = ctx.args
        offset = per_row[0] if per_row else offset
        seq = None if packed is None else packed.seq
        R, L = q.shape[2], k.shape[2]
        do = do.to(q.dtype)
        delta = (do * o).sum(dim=-1)  # sum_j p_j dp_j per row, (B, Hkv, R)
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for a in range(0, L, block):
            b = min(a + block, L)
            r0, r1 = _row_range(a, offset, group, R, block, packed)
            s = q[:, :, r0:r1] @ k[:, :, a:b].transpose(-1, -2) * scale
            visible = _visible(a, b, offset, r0, r1, group, q.device, seq)
            if visible is not None:
                s = s.masked_fill(~visible, -math.inf)
            p = torch.exp(s - lse[:, :, r0:r1, None])  # the forward's probabilities, recomputed
            dv[:, :, a:b] = p.transpose(-1, -2) @ do[:, :, r0:r1]
            dp = do[:, :, r0:r1] @ v[:, :, a:b].transpose(-1, -2)
            ds = p * (dp - delta[:, :, r0:r1, None]) * scale  # softmax backward, then the score scale
            dq[:, :, r0:r1] += ds @ k[:, :, a:b]
            dk[:, :, a:b] = ds.transpose(-1, -2) @ q[:, :, r0:r1]
        return dq, dk, dv, None, None, None, None, None


def _parallel(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal SDPA over ``q [B, T, H, Dk]`` and ``k, v [B, T, Hkv, D]`` (no cache)."""
    H, Hkv = q.shape[2], k.shape[2]
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, D)
    return F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, enable_gqa=H != Hkv).transpose(1, 2)


def _recurrent(q5: Tensor, k: Tensor, v: Tensor, offset: int | Tensor, scale: float) -> Tensor:
    """Token by token: ``q5 [B, Hkv, T, G, Dk]`` against ``k, v [B, Hkv, L, D]``; returns ``[B, Hkv, T, G, Dv]``.
    With an int ``offset`` each query reads the keys up to its own; with per-row offsets ``[B]``, all ``L``
    under a mask."""
    outs = []
    for t in range(q5.shape[2]):
        if isinstance(offset, Tensor):
            s = q5[:, :, t] @ k.transpose(-1, -2) * scale  # (B, Hkv, G, L)
            visible = torch.arange(k.shape[2], device=k.device) <= (offset + t)[:, None, None, None]
            outs.append(torch.softmax(torch.where(visible, s, -math.inf), dim=-1) @ v)
            continue
        end = offset + t + 1  # the cache plus this token
        s = q5[:, :, t] @ k[:, :, :end].transpose(-1, -2) * scale  # (B, Hkv, G, end)
        outs.append(torch.softmax(s, dim=-1) @ v[:, :, :end])
    return torch.stack(outs, dim=2)


def _write(cache: Tensor, new: Tensor, index: Tensor, in_place: bool, rows: Tensor | None = None) -> Tensor:
    """``cache [B, Hkv, C, D]`` with ``new [B, T, Hkv, D]`` written at rows' slots ``index [B, T]`` (or, with
    ``rows``, ``new [T, Hkv, D]`` token t at row ``rows[t]``, slot ``index[t]``).

    An ``index_put`` through the token-major view (``cache[rows, :, index] = new``), as gpt-fast writes its cache:
    a compiled graph does it in place on the input buffer instead of copying the whole cache back. Out of place,
    the copy keeps the cache's head-major memory layout."""
    if rows is None:
        rows = torch.arange(cache.shape[0], device=cache.device)[:, None]
    by_token = cache.transpose(1, 2)  # (B, C, Hkv, D), a view
    if in_place:
        by_token.index_put_((rows, index), new)
        return cache
    return by_token.index_put((rows, index), new).transpose(1, 2)


def _parallel_per_row(q: Tensor, k: Tensor, v: Tensor, length: Tensor) -> Tensor:
    """SDPA of ``q [B, T, H, Dk]`` over a cache's whole capacity ``k, v [B, Hkv, C, D]``, query t of row b
    seeing slots up to ``length[b] + t``."""
    T, H, Hkv, C = q.shape[1], q.shape[2], k.shape[1], k.shape[2]
    pos = length[:, None] + torch.arange(T, device=q.device)  # (B, T)
    mask = (torch.arange(C, device=q.device) <= pos[:, :, None])[:, None]  # (B, 1, T, C)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask, enable_gqa=H != Hkv)
    return o.transpose(1, 2)


def softmax_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mode: str,
    chunk_size: int | None,
    initial_state: KVCache | None,
    cu_seqlens: Packing | None = None,
) -> tuple[Tensor, KVCache]:
    """The torch backend of ``mixers.functional.softmax_attention`` (inputs already validated; a cache has room
    for the new tokens and its ``length``).

    ``cu_seqlens`` (``packs=True``): q, k, v ``[1, T, H, D]`` hold ``cu_seqlens.n`` sequences back to back,
    ``initial_state`` is None or a cache with ``n`` rows (row n with room for sequence n after its ``length``);
    returns ``o [1, T, H, Dv]`` and the cache with ``n`` rows (capacity: the longest sequence, without a cache),
    no token attending across a boundary (module docstring)."""
    if cu_seqlens is not None:
        return _packed(q, k, v, mode, chunk_size, initial_state, cu_seqlens)
    B, T, H, _ = q.shape
    Dv = v.shape[-1]
    if initial_state is None:  # the cache is the new keys and values, head-major views of them (no copy)
        cache = KVCache(k.transpose(1, 2), v.transpose(1, 2), torch.full((B,), T, dtype=torch.int64, device=q.device))
        offset: int | Tensor = 0
    else:
        offset = initial_state.length
        index = offset[:, None] + torch.arange(T, device=q.device)  # (B, T): where each row's new tokens go
        recording = nonfinite.recording(k, v, initial_state.k, initial_state.v)
        write = [_write(c, n, index, in_place=not recording) for c, n in ((initial_state.k, k), (initial_state.v, v))]
        cache = KVCache(*write, offset + T)
    if T == 0:
        return q.new_empty(B, 0, H, Dv), cache
    (q, k_fin, v_fin), found = nonfinite.finite_parts(q, k, v)
    if found is None:
        kh, vh = cache.k, cache.v  # (B, Hkv, L, D)
    elif initial_state is None:
        kh, vh = k_fin.transpose(1, 2), v_fin.transpose(1, 2)
    else:  # compute on copies holding the zeroed tokens; the returned cache keeps them as given
        kh, vh = (_write(c, n, index, in_place=False) for c, n in ((cache.k, k_fin), (cache.v, v_fin)))
    o = _attend(q, kh, vh, offset, mode, chunk_size, with_cache=initial_state is not None)
    return (o if found is None else o + found.o), cache


def _attend(
    q: Tensor,
    kh: Tensor,
    vh: Tensor,
    offset: int | Tensor,
    mode: str,
    chunk_size: int | None,
    with_cache: bool,
    packed: _Packed | None = None,
) -> Tensor:
    """``o [B, T, H, Dv]`` of ``q [B, T, H, Dk]`` against the keys and values ``kh, vh [B, Hkv, L, D]`` in
    ``mode``; the new tokens are the last T (``offset``: the tokens before them, per row with a cache). With
    ``packed`` (chunkwise mode only), the row holds packed sequences that attend within themselves."""
    Dk, Hkv = q.shape[-1], kh.shape[1]
    G = q.shape[2] // Hkv
    if mode == "parallel":
        if not with_cache:
            return _parallel(q, kh.transpose(1, 2), vh.transpose(1, 2))
        return _parallel_per_row(q, kh, vh, offset)

    acc = state_dtype(q.dtype)
    scale = Dk**-0.5
    # Layout changes once per call (einops reads as what it does; none runs inside the loops).
    q5 = rearrange(q.to(acc), "b t (h g) d -> b h t g d", g=G)  # the G query heads sharing key head h
    kh, vh = kh.to(acc), vh.to(acc)
    if mode == "recurrent":
        o5 = _recurrent(q5, kh, vh, offset, scale)
    else:
        rows = rearrange(q5, "b h t g d -> b h (t g) d")  # row r is token r // G
        o = _BlockwiseAttention.apply(rows, kh, vh, offset, G, chunk_size, scale, packed)
        o5 = rearrange(o, "b h (t g) d -> b h t g d", g=G)
    return rearrange(o5, "b h t g d -> b t (h g) d").to(q.dtype)


def _packed(
    q: Tensor, k: Tensor, v: Tensor, mode: str, chunk_size: int | None, cache: KVCache | None, packing: Packing
) -> tuple[Tensor, KVCache]:
    """Softmax attention over the packed sequences of ``q, k, v [1, T, H, D]`` (module docstring)."""
    T, H, Dv = q.shape[1], q.shape[2], v.shape[3]
    seq = packing.seq_id
    if cache is None:
        out = KVCache(_by_sequence(k, packing), _by_sequence(v, packing), packing.lengths)
    else:
        index = cache.length[seq] + packing.offsets  # each token's slot in its row
        in_place = not nonfinite.recording(k, v, cache.k, cache.v)
        written = (_write(c, x[0], index, in_place, rows=seq) for c, x in ((cache.k, k), (cache.v, v)))
        out = KVCache(*written, cache.length + packing.lengths)
    if T == 0:
        return q.new_empty(1, 0, H, Dv), out
    (q, k_fin, v_fin), found = nonfinite.finite_parts(q, k, v, packing)
    if cache is None and mode == "chunkwise":  # the row itself: each key block visits its sequences' rows only
        bounds = packing.bounds
        ends = tuple(bounds[bisect.bisect_right(bounds, min(a + chunk_size, T) - 1)] for a in range(0, T, chunk_size))
        kh, vh = k_fin.transpose(1, 2), v_fin.transpose(1, 2)
        o = _attend(q, kh, vh, 0, mode, chunk_size, with_cache=False, packed=_Packed(seq, ends))
    else:
        keys = None
        if cache is not None and found is None:
            keys = (out.k, out.v, cache.length)
        elif cache is not None:  # the zeroed tokens, in copies (the returned cache keeps them as given)
            keys = (
                *(_write(c, x[0], index, False, rows=seq) for c, x in ((out.k, k_fin), (out.v, v_fin))),
                cache.length,
            )
        o = _bucketed(q, k_fin, v_fin, keys, mode, chunk_size, packing)
    return (o if found is None else o + found.o), out


def _by_sequence(x: Tensor, packing: Packing) -> Tensor:
    """The packed ``x [1, T, h, D]`` as a cache ``[n, h, L, D]`` (``L`` the longest sequence): row n holds
    sequence n's tokens, then zeros."""
    L = packing.longest
    rows = x.new_zeros(packing.n * L, *x.shape[2:]).index_copy(0, packing.seq_id * L + packing.offsets, x[0])
    return rows.unflatten(0, (packing.n, L)).transpose(1, 2)


def _bucketed(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cache: tuple[Tensor, Tensor, Tensor] | None,
    mode: str,
    chunk_size: int | None,
    packing: Packing,
) -> Tensor:
    """``o [1, T, H, Dv]`` of the packed sequences, a padded batch (a row per sequence) per bucket of similar
    lengths; against their own keys and values, or the ``cache`` rows ``(k, v, length)`` they were written into."""
    outs = []
    groups = buckets(packing)
    for layout in groups.layouts:

        def padded(x: Tensor, layout: Ragged = layout) -> Tensor:  # [rows, L, h, D]: each sequence, then repeats
            return layout.gather(x).unflatten(0, (layout.order.shape[0], layout.C))

        if cache is None:
            kb, vb, offset = padded(k).transpose(1, 2), padded(v).transpose(1, 2), 0
        elif layout.in_order:
            kb, vb, offset = cache
        else:
            kb, vb, offset = (x.index_select(0, layout.order) for x in cache)
        ob = _attend(padded(q), kb, vb, offset, mode, chunk_size, with_cache=cache is not None)
        outs.append(layout.scatter(ob))
    return groups.join(outs)[None]


@hookimpl
def register_backends(register: BackendRegistrar) -> None:
    register(
        Backend(
            op="softmax_attention",
            name="torch",
            fn=softmax_attention,
            priority=0,
            packs=True,
            description="pure torch (parallel through scaled_dot_product_attention); any device and dtype",
        )
    )
