"""Causal softmax attention in pure torch, continuing from a KV cache.

- parallel: ``torch.nn.functional.scaled_dot_product_attention`` (its fused CPU/GPU kernels), with an
  explicit bottom-right causal mask when a cache precedes the new tokens.
- chunkwise: blockwise attention over key blocks of ``chunk_size`` with an online softmax (running
  max, running sum), as in FlashAttention-2. It is an ``autograd.Function`` whose backward
  recomputes each block's probabilities from the saved log-sum-exp instead of keeping them, so the
  training memory is ``O(T * chunk_size)`` rather than the ``O(T^2)`` that autograd through the
  loop would save.
- recurrent: token by token, each query against the cache up to and including its own token.

Grouped-query attention is computed without copying keys: the ``G = H / Hkv`` query heads that share a
key head are folded into the query rows (``[B, Hkv, T * G, Dk]``; row ``r`` is token ``r // G``).
Chunkwise and recurrent run in float32 (float64 for float64 inputs); the cache keeps the input dtype.

Causality with non-finite inputs. Parallel and chunkwise weigh a whole block of values by probabilities that
are exactly 0 for later keys, and ``0 * NaN`` is NaN; SDPA with an explicit mask even adds ``-inf`` to a
later key's NaN score. So they take the new keys and values with their non-finite entries zeroed, and
``_excluded`` adds those entries back to the outputs from their own position on: a NaN or inf at position
t leaves every output before t as it was, and makes the outputs from t on non-finite. The cache, which
every new query sees whole, and the returned cache keep the values as given. (On the CPU, new keys and
values that are all finite skip this: it would change nothing.)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from mixers.backends.torch_retention import may_be_nonfinite
from mixers.functional import KVCache, state_dtype


def _visible(a: int, b: int, offset: int, r0: int, R: int, group: int, device: torch.device) -> Tensor | None:
    """Mask ``[R - r0, b - a]`` of keys ``a..b-1`` that rows ``r0..R-1`` may see, or ``None`` if they see all."""
    if b - 1 <= offset + r0 // group:  # the block ends at or before the earliest row's position
        return None
    pos = offset + torch.arange(r0, R, device=device) // group
    return torch.arange(a, b, device=device)[None, :] <= pos[:, None]


class _BlockwiseAttention(torch.autograd.Function):
    """``q [B, Hkv, R, Dk]`` (row r at position ``offset + r // group``) against ``k, v [B, Hkv, L, D]``."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, offset: int, group: int, block: int, scale: float) -> Tensor:  # type: ignore[override]
        R, L = q.shape[2], k.shape[2]
        m = q.new_full(q.shape[:3], -math.inf)  # running max of the scores, (B, Hkv, R)
        total = q.new_zeros(q.shape[:3])  # running sum of exp(score - m)
        acc = q.new_zeros(*q.shape[:3], v.shape[-1])  # running sum of exp(score - m) v
        for a in range(0, L, block):
            b = min(a + block, L)
            r0 = max(0, a - offset) * group  # rows before r0 sit before key a and see none of this block
            s = q[:, :, r0:] @ k[:, :, a:b].transpose(-1, -2) * scale  # (B, Hkv, R - r0, b - a)
            visible = _visible(a, b, offset, r0, R, group, q.device)
            if visible is not None:
                s = s.masked_fill(~visible, -math.inf)
            # Every row from r0 on sees key a, so the block max and m_new are finite.
            m_new = torch.maximum(m[:, :, r0:], s.amax(dim=-1))
            p = torch.exp(s - m_new[..., None])
            alpha = torch.exp(m[:, :, r0:] - m_new)  # rescales what was summed under the old max
            total[:, :, r0:] = alpha * total[:, :, r0:] + p.sum(dim=-1)
            acc[:, :, r0:] = alpha[..., None] * acc[:, :, r0:] + p @ v[:, :, a:b]
            m[:, :, r0:] = m_new
        o = acc / total[..., None]  # every row sees at least its own key, so total >= 1
        ctx.save_for_backward(q, k, v, o, m + total.log())
        ctx.args = (offset, group, block, scale)
        return o

    @staticmethod
    @once_differentiable
    def backward(ctx, do: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        q, k, v, o, lse = ctx.saved_tensors
        offset, group, block, scale = ctx.args
        R, L = q.shape[2], k.shape[2]
        do = do.to(q.dtype)
        delta = (do * o).sum(dim=-1)  # sum_j p_j dp_j per row, (B, Hkv, R)
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for a in range(0, L, block):
            b = min(a + block, L)
            r0 = max(0, a - offset) * group
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


def _parallel(q: Tensor, k: Tensor, v: Tensor, offset: int) -> Tensor:
    """SDPA over ``q [B, T, H, Dk]`` and the full keys ``k, v [B, offset + T, Hkv, D]``."""
    T, H, L, Hkv = q.shape[1], q.shape[2], k.shape[1], k.shape[2]
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T or L, D)
    if offset == 0:
        o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, enable_gqa=H != Hkv)
    else:  # SDPA's is_causal aligns the mask top-left; with a cache, query t sits at position offset + t
        mask = torch.arange(L, device=q.device)[None, :] <= offset + torch.arange(T, device=q.device)[:, None]
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, enable_gqa=H != Hkv)
    return o.transpose(1, 2)


def _excluded(k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The new keys and values with non-finite entries zeroed, and what they lacked, summed over time:
    ``[B, T, Hkv, Dv]``, zero before the first non-finite key or value of a head and non-finite from it on
    (a non-finite key contributes NaN to every value channel). Added to the outputs, it makes each output
    non-finite exactly when a non-finite key or value at or before its position enters it. No gradient
    flows through it; through the zeroed inputs, finite entries get theirs unchanged."""
    k_fin = torch.nan_to_num(k, nan=0.0, posinf=0.0, neginf=0.0)
    v_fin = torch.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0)
    with torch.no_grad():
        lacking = (v - v_fin).add_((k - k_fin).mul_(0).sum(-1, keepdim=True))  # x * 0: 0, or NaN if x is not finite
    return k_fin, v_fin, lacking.cumsum_(1)


def _recurrent(q5: Tensor, k: Tensor, v: Tensor, offset: int, scale: float) -> Tensor:
    """Token by token: ``q5 [B, Hkv, T, G, Dk]`` against ``k, v [B, Hkv, L, D]``; returns ``[B, Hkv, T, G, Dv]``."""
    outs = []
    for t in range(q5.shape[2]):
        end = offset + t + 1  # the cache plus this token
        s = q5[:, :, t] @ k[:, :, :end].transpose(-1, -2) * scale  # (B, Hkv, G, end)
        outs.append(torch.softmax(s, dim=-1) @ v[:, :, :end])
    return torch.stack(outs, dim=2)


def softmax_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mode: str,
    chunk_size: int | None,
    initial_state: KVCache | None,
) -> tuple[Tensor, KVCache]:
    """The torch backend of ``mixers.functional.softmax_attention`` (inputs already validated)."""
    B, T, H, Dk = q.shape
    Hkv, Dv = k.shape[2], v.shape[-1]
    G = H // Hkv
    offset = 0 if initial_state is None else initial_state.k.shape[1]

    def with_cache(k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if initial_state is None:
            return k, v
        return torch.cat([initial_state.k, k], dim=1), torch.cat([initial_state.v, v], dim=1)  # (B, L, Hkv, D)

    cache = KVCache(*with_cache(k, v))
    if T == 0:
        return q.new_empty(B, 0, H, Dv), cache
    lacking = None
    if mode != "recurrent" and may_be_nonfinite(k, v):  # (token by token, each query sees only what it may)
        k_fin, v_fin, lacking = _excluded(k, v)
        k, v = with_cache(k_fin, v_fin)
    else:
        k, v = cache
    if mode == "parallel":
        o = _parallel(q, k, v, offset)
        if lacking is None:
            return o, cache
        return (o.unflatten(2, (Hkv, G)) + lacking[:, :, :, None]).flatten(2, 3), cache  # (SDPA saved o: not in place)

    acc = state_dtype(q.dtype)
    scale = Dk**-0.5
    q5 = q.to(acc).view(B, T, Hkv, G, Dk).permute(0, 2, 1, 3, 4)  # (B, Hkv, T, G, Dk)
    kh, vh = k.to(acc).transpose(1, 2), v.to(acc).transpose(1, 2)  # (B, Hkv, L, D)
    if mode == "recurrent":
        o5 = _recurrent(q5, kh, vh, offset, scale)
    else:
        rows = q5.reshape(B, Hkv, T * G, Dk)
        o = _BlockwiseAttention.apply(rows, kh, vh, offset, G, chunk_size, scale)
        o5 = o.view(B, Hkv, T, G, Dv)
    o = o5.permute(0, 2, 1, 3, 4)  # (B, T, Hkv, G, Dv)
    if lacking is not None:
        o = o + lacking[:, :, :, None].to(acc)
    return o.reshape(B, T, H, Dv).to(q.dtype), cache
