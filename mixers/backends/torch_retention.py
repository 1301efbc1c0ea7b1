"""Retention in pure torch: the reference backend, differentiable by autograd.

All three modes share one building block, ``_chunks``, which handles N equal chunks of C tokens at
once: the parallel form is a single chunk of T tokens; the chunkwise form is N full chunks plus one
tail chunk (so any chunk size works, dividing T or not). Every decay power is ``exp(e * log gamma)``
with ``0 <= e <= C``, never ``gamma^(-t)``, so nothing overflows on long sequences.

Inputs arrive validated by ``mixers.functional.retention``; ``gamma`` is a float64 tensor ``[H]``.
Computation runs in float32 (float64 for float64 inputs); ``o`` is cast back to the input dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mixers.functional import state_dtype


def _decays(log_g: Tensor, C: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Decay factors for chunks of C tokens, from ``log_g = log gamma`` ``[H]``.

    Returns ``intra [H, C, C]`` (``gamma^(i-j)`` for ``i >= j``, else 0), ``q_decay [H, C]``
    (``gamma^(i+1)``: how much the incoming state reaches token i), ``k_decay [H, C]``
    (``gamma^(C-1-j)``: how much token j reaches the outgoing state) and ``chunk_decay [H]``
    (``gamma^C``).
    """
    i = torch.arange(C, device=log_g.device, dtype=log_g.dtype)
    diff = i[:, None] - i[None, :]
    causal = diff >= 0
    intra = torch.exp(diff.clamp(min=0) * log_g[:, None, None]) * causal
    q_decay = torch.exp((i + 1) * log_g[:, None])
    k_decay = torch.exp((C - 1 - i) * log_g[:, None])
    chunk_decay = torch.exp(C * log_g)
    return intra, q_decay, k_decay, chunk_decay


def _chunks(q: Tensor, k: Tensor, v: Tensor, log_g: Tensor, state: Tensor | None) -> tuple[Tensor, Tensor]:
    """Retention over ``q, k: [B, H, N, C, Dk]``, ``v: [B, H, N, C, Dv]`` from ``state [B, H, Dk, Dv]``."""
    B, H, N, C, Dk = q.shape
    Dv = v.shape[-1]
    intra, q_decay, k_decay, chunk_decay = _decays(log_g, C)
    o = (q @ k.transpose(-1, -2) * intra[:, None]) @ v  # inside each chunk, (B, H, N, C, Dv)
    kv = k.transpose(-1, -2) @ (v * k_decay[:, None, :, None])  # each chunk's contribution, (B, H, N, Dk, Dv)
    if state is None and N == 1:
        return o, kv[:, :, 0]
    if state is None:
        state = q.new_zeros(B, H, Dk, Dv)
    incoming = []  # the state entering each chunk
    decay = chunk_decay[:, None, None]
    for n in range(N):
        incoming.append(state)
        state = decay * state + kv[:, :, n]
    o = o + (q * q_decay[:, None, :, None]) @ torch.stack(incoming, dim=2)
    return o, state


def _recurrent(q: Tensor, k: Tensor, v: Tensor, gamma: Tensor, state: Tensor | None) -> tuple[Tensor, Tensor]:
    """Token by token: ``S_t = gamma S_{t-1} + k_t^T v_t``, ``o_t = q_t S_t``. ``q, k, v: [B, T, H, D]``."""
    B, T, H, Dk = q.shape
    if state is None:
        state = q.new_zeros(B, H, Dk, v.shape[-1])
    g = gamma[:, None, None]
    outs = []
    for t in range(T):
        state = g * state + k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append((q[:, t, :, None, :] @ state).squeeze(-2))  # (B, H, Dv)
    return torch.stack(outs, dim=1), state


def retention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gamma: Tensor,
    *,
    mode: str,
    chunk_size: int | None,
    initial_state: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """The torch backend of ``mixers.functional.retention`` (inputs already validated)."""
    out_dtype = q.dtype
    acc = state_dtype(q.dtype)
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    if T == 0:
        state = initial_state if initial_state is not None else q.new_zeros(B, H, Dk, Dv, dtype=acc)
        return v.new_empty(B, 0, H, Dv), state
    q, k, v = q.to(acc), k.to(acc), v.to(acc)
    gamma = gamma.to(acc)
    if mode == "recurrent":
        o, state = _recurrent(q, k, v, gamma, initial_state)
        return o.to(out_dtype), state

    log_g = torch.log(gamma.to(torch.float64)).to(acc)
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
    C = T if mode == "parallel" else min(chunk_size, T)
    N, tail = divmod(T, C)
    full = N * C
    pieces = []
    state = initial_state
    if N:
        o, state = _chunks(
            qh[:, :, :full].reshape(B, H, N, C, Dk),
            kh[:, :, :full].reshape(B, H, N, C, Dk),
            vh[:, :, :full].reshape(B, H, N, C, Dv),
            log_g,
            state,
        )
        pieces.append(o.reshape(B, H, full, Dv))
    if tail:
        o, state = _chunks(
            qh[:, :, full:].unsqueeze(2),
            kh[:, :, full:].unsqueeze(2),
            vh[:, :, full:].unsqueeze(2),
            log_g,
            state,
        )
        pieces.append(o.reshape(B, H, tail, Dv))
    o = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)
    return o.transpose(1, 2).to(out_dtype), state
