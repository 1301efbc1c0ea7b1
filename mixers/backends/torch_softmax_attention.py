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
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor
from torch.autograd.function import once_differentiable

from mixers.backends import nonfinite
from mixers.functional import KVCache, state_dtype


def _visible(a: int, b: int, offset: int | Tensor, r0: int, R: int, group: int, device: torch.device) -> Tensor | None:
    """Mask of keys ``a..b-1`` that rows ``r0..R-1`` may see (row r at ``offset + r // group``), or ``None`` if
    they see all: ``[R - r0, b - a]`` for an int offset, ``[B, 1, R - r0, b - a]`` for per-row offsets ``[B]``."""
    rows = torch.arange(r0, R, device=device) // group
    if isinstance(offset, Tensor):
        pos = offset[:, None, None] + rows[None, :, None]  # (B, R - r0, 1)
        return (torch.arange(a, b, device=device) <= pos)[:, None]
    if b - 1 <= offset + r0 // group:  # the block ends at or before the earliest row's position
        return None
    return torch.arange(a, b, device=device)[None, :] <= (offset + rows)[:, None]


def _start_row(a: int, offset: int | Tensor, group: int) -> int:
    """The first row that may see key ``a``: rows before it sit before the key (0 for per-row offsets)."""
    return 0 if isinstance(offset, Tensor) else max(0, a - offset) * group


class _BlockwiseAttention(torch.autograd.Function):
    """``q [B, Hkv, R, Dk]`` (row r at position ``offset + r // group``; ``offset`` an int or per batch row
    ``[B]``) against ``k, v [B, Hkv, L, D]``."""

    @staticmethod
    def forward(
        ctx, q: Tensor, k: Tensor, v: Tensor, offset: int | Tensor, group: int, block: int, scale: float
    ) -> Tensor:  # type: ignore[override]
        R, L = q.shape[2], k.shape[2]
        m = q.new_full(q.shape[:3], -math.inf)  # running max of the scores, (B, Hkv, R)
        total = q.new_zeros(q.shape[:3])  # running sum of exp(score - m)
        acc = q.new_zeros(*q.shape[:3], v.shape[-1])  # running sum of exp(score - m) v
        for a in range(0, L, block):
            b = min(a + block, L)
            r0 = _start_row(a, offset, group)  # rows before r0 sit before key a and see none of this block
            s = q[:, :, r0:] @ k[:, :, a:b].transpose(-1, -2) * scale  # (B, Hkv, R - r0, b - a)
            visible = _visible(a, b, offset, r0, R, group, q.device)
            if visible is not None:
                s = s.masked_fill(~visible, -math.inf)
            # Every row sees key 0 (in the first block), so m_new is finite from there on.
            m_new = torch.maximum(m[:, :, r0:], s.amax(dim=-1))
            p = torch.exp(s - m_new[..., None])
            alpha = torch.exp(m[:, :, r0:] - m_new)  # rescales what was summed under the old max
            total[:, :, r0:] = alpha * total[:, :, r0:] + p.sum(dim=-1)
            acc[:, :, r0:] = alpha[..., None] * acc[:, :, r0:] + p @ v[:, :, a:b]
            m[:, :, r0:] = m_new
        o = acc / total[..., None]  # every row sees at least its own key, so total >= 1
        if isinstance(offset, Tensor):
            ctx.save_for_backward(q, k, v, o, m + total.log(), offset)
            ctx.args = (None, group, block, scale)
        else:
            ctx.save_for_backward(q, k, v, o, m + total.log())
            ctx.args = (offset, group, block, scale)
        return o

    @staticmethod
    @once_differentiable
    def backward(ctx, do: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        q, k, v, o, lse, *per_row = ctx.saved_tensors
        offset, group, block, scale = ctx.args
        offset = per_row[0] if per_row else offset
        R, L = q.shape[2], k.shape[2]
        do = do.to(q.dtype)
        delta = (do * o).sum(dim=-1)  # sum_j p_j dp_j per row, (B, Hkv, R)
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for a in range(0, L, block):
            b = min(a + block, L)
            r0 = _start_row(a, offset, group)
            s = q[:, :, r0:] @ k[:, :, a:b].transpose(-1, -2) * scale
            visible = _visible(a, b, offset, r0, R, group, q.device)
            if visible is not None:
                s = s.masked_fill(~visible, -math.inf)
            p = torch.exp(s - lse[:, :, r0:, None])  # the forward's probabilities, recomputed
            dv[:, :, a:b] = p.transpose(-1, -2) @ do[:, :, r0:]
            dp = do[:, :, r0:] @ v[:, :, a:b].transpose(-1, -2)
            ds = p * (dp - delta[:, :, r0:, None]) * scale  # softmax backward, then the score scale
            dq[:, :, r0:] += ds @ k[:, :, a:b]
            dk[:, :, a:b] = ds.transpose(-1, -2) @ q[:, :, r0:]
        return dq, dk, dv, None, None, None, None


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


def _write(cache: Tensor, new: Tensor, index: Tensor, in_place: bool) -> Tensor:
    """``cache [B, Hkv, C, D]`` with ``new [B, T, Hkv, D]`` written at rows' slots ``index [B, T]``.

    An ``index_put`` through the token-major view (``cache[rows, :, index] = new``), as gpt-fast writes its cache:
    a compiled graph does it in place on the input buffer instead of copying the whole cache back. Out of place,
    the copy keeps the cache's head-major memory layout."""
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
) -> tuple[Tensor, KVCache]:
    """The torch backend of ``mixers.functional.softmax_attention`` (inputs already validated; a cache has room
    for the new tokens and its ``length``)."""
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
    q: Tensor, kh: Tensor, vh: Tensor, offset: int | Tensor, mode: str, chunk_size: int | None, with_cache: bool
) -> Tensor:
    """``o [B, T, H, Dv]`` of ``q [B, T, H, Dk]`` against the keys and values ``kh, vh [B, Hkv, L, D]`` in
    ``mode``; the new tokens are the last T (``offset``: the tokens before them, per row with a cache)."""
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
        o = _BlockwiseAttention.apply(rows, kh, vh, offset, G, chunk_size, scale)
        o5 = rearrange(o, "b h (t g) d -> b h t g d", g=G)
    return rearrange(o5, "b h t g d -> b t (h g) d").to(q.dtype)
