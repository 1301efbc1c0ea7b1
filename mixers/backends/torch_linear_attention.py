"""Causal linear attention in pure torch: the reference backend, differentiable by autograd.

The normaliser ``q_t . z_t`` is the numerator with every value replaced by 1, so the values get a
column of ones appended: one pass then carries ``[kv | z]`` as a single ``[Dk, Dv + 1]`` state and
yields numerator and denominator together.

Without a decay, the state entering chunk n is just the initial state plus the sum of the earlier
chunks' contributions, an exclusive cumulative sum; the chunkwise form needs no loop over chunks.
The parallel form is the chunkwise form with one chunk of T tokens, and any chunk size works (the
last chunk may be shorter).

Inputs arrive validated by ``mixers.functional.linear_attention``. Computation runs in float32
(float64 for float64 inputs); ``o`` is cast back to the input dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mixers.functional import LinearState, state_dtype


def guard(den: Tensor, eps: float) -> Tensor:
    """Move ``den`` at least ``eps`` away from zero, keeping its sign (``+eps`` for 0)."""
    return torch.where(den < 0, den.clamp(max=-eps), den.clamp(min=eps))


def _chunks(q: Tensor, k: Tensor, v: Tensor, state: Tensor | None) -> tuple[Tensor, Tensor]:
    """Linear attention over ``q, k: [B, H, N, C, Dk]``, ``v: [B, H, N, C, Dv]`` from ``state [B, H, Dk, Dv]``."""
    C = q.shape[3]
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    o = (q @ k.transpose(-1, -2)).masked_fill(~causal, 0) @ v  # inside each chunk, (B, H, N, C, Dv)
    kv = k.transpose(-1, -2) @ v  # each chunk's contribution, (B, H, N, Dk, Dv)
    incoming = torch.cat([torch.zeros_like(kv[:, :, :1]), kv[:, :, :-1].cumsum(dim=2)], dim=2)  # earlier chunks
    if state is not None:
        incoming = incoming + state[:, :, None]
    final = incoming[:, :, -1] + kv[:, :, -1]
    return o + q @ incoming, final


def _recurrent(q: Tensor, k: Tensor, v: Tensor, state: Tensor | None) -> tuple[Tensor, Tensor]:
    """Token by token: ``S_t = S_{t-1} + k_t^T v_t``, ``o_t = q_t S_t``. ``q, k, v: [B, T, H, D]``."""
    B, T, H, Dk = q.shape
    if state is None:
        state = q.new_zeros(B, H, Dk, v.shape[-1])
    outs = []
    for t in range(T):
        state = state + k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append((q[:, t, :, None, :] @ state).squeeze(-2))  # (B, H, Dv)
    return torch.stack(outs, dim=1), state


def linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mode: str,
    chunk_size: int | None,
    initial_state: LinearState | None,
    normalize: bool,
    eps: float,
) -> tuple[Tensor, LinearState]:
    """The torch backend of ``mixers.functional.linear_attention`` (inputs already validated)."""
    out_dtype = q.dtype
    acc = state_dtype(q.dtype)
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    state = None if initial_state is None else torch.cat([initial_state.kv, initial_state.z[..., None]], dim=-1)
    if T == 0:
        if initial_state is None:
            initial_state = LinearState(q.new_zeros(B, H, Dk, Dv, dtype=acc), q.new_zeros(B, H, Dk, dtype=acc))
        return v.new_empty(B, 0, H, Dv), initial_state
    q, k, v = q.to(acc), k.to(acc), v.to(acc)
    v = torch.cat([v, v.new_ones(B, T, H, 1)], dim=-1)  # the ones column makes the normaliser
    if mode == "recurrent":
        o, state = _recurrent(q, k, v, state)
    else:
        qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        C = T if mode == "parallel" else min(chunk_size, T)
        N, tail = divmod(T, C)
        full = N * C
        pieces = []
        if N:
            o, state = _chunks(
                qh[:, :, :full].reshape(B, H, N, C, Dk),
                kh[:, :, :full].reshape(B, H, N, C, Dk),
                vh[:, :, :full].reshape(B, H, N, C, Dv + 1),
                state,
            )
            pieces.append(o.reshape(B, H, full, Dv + 1))
        if tail:
            tails = (t[:, :, full:].unsqueeze(2) for t in (qh, kh, vh))  # one chunk of `tail` tokens
            o, state = _chunks(*tails, state)
            pieces.append(o.reshape(B, H, tail, Dv + 1))
        o = (pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)).transpose(1, 2)  # (B, T, H, Dv + 1)
    num, den = o[..., :Dv], o[..., Dv:]
    o = num / guard(den, eps) if normalize else num
    return o.to(out_dtype), LinearState(state[..., :Dv].contiguous(), state[..., Dv].contiguous())
