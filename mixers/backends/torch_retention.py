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
    # Built in place: in parallel mode C = T and every [H, C, C] temporary would cost as much as the scores.
    intra = torch.mul(diff.clamp(min=0), log_g[:, None, None]).exp_().masked_fill_(diff < 0, 0)
    q_decay = torch.exp((i + 1) * log_g[:, None])
    k_decay = torch.exp((C - 1 - i) * log_g[:, None])
    chunk_decay = torch.exp(C * log_g)
    return intra, q_decay, k_decay, chunk_decay


def _carry(kv: Tensor, state: Tensor, chunk_decay: Tensor, *, reverse: bool = False) -> tuple[Tensor, Tensor]:
    """Run ``S <- chunk_decay * S + kv[:, :, n]`` over the chunks (backwards if ``reverse``).

    Returns the value of ``S`` before each step ``[B, H, N, Dk, Dv]`` and after the last one. The loop
    is over chunks (T / C steps) and touches only ``[B, H, Dk, Dv]`` states.
    """
    before = torch.empty_like(kv)
    decay = chunk_decay[:, None, None]
    order = range(kv.shape[2] - 1, -1, -1) if reverse else range(kv.shape[2])
    for n in order:
        before[:, :, n] = state
        state = torch.addcmul(kv[:, :, n], decay, state)
    return before, state


def _bmm(a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
    """``a @ b`` over matching leading dims, as one ``bmm`` on flattened batch views (no copies of
    transposed operands, which ``torch.matmul`` on 5-D tensors makes). With ``out``: ``out += a @ b``."""
    a3, b3 = a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:])
    if out is None:
        return torch.bmm(a3, b3).view(*a.shape[:-1], b.shape[-1])
    out.view(-1, *out.shape[-2:]).baddbmm_(a3, b3)
    return out


class _Chunks(torch.autograd.Function):
    """Retention over N equal chunks ``q, k: [B, H, N, C, Dk]``, ``v: [B, H, N, C, Dv]`` from ``state``.

    Inside a chunk: ``o = ((q k^T) * D) v``; across chunks: ``o += (q * gamma^(i+1)) S_in``, with
    ``S_out = gamma^C S_in + k^T (v * gamma^(C-1-j))``. The backward is written out by hand so that it
    saves only q, k, v and the incoming states and recomputes the ``C x C`` scores, instead of autograd
    keeping every intermediate (and zero-filling a full gradient buffer per chunk of the state loop).
    Inputs must be contiguous.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, state: Tensor, log_g: Tensor) -> tuple[Tensor, Tensor]:
        intra, q_decay, k_decay, chunk_decay = _decays(log_g, q.shape[-2])
        scores = _bmm(q, k.transpose(-1, -2)).mul_(intra[:, None])  # (B, H, N, C, C)
        kv = _bmm((k * k_decay[:, None, :, None]).transpose(-1, -2), v)  # chunk's share of the state (B, H, N, Dk, Dv)
        incoming, final = _carry(kv, state, chunk_decay)
        o = _bmm(scores, v, out=_bmm(q * q_decay[:, None, :, None], incoming))  # (B, H, N, C, Dv)
        ctx.save_for_backward(q, k, v, incoming, log_g)
        return o, final

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do: Tensor, dfinal: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, None]:
        q, k, v, incoming, log_g = ctx.saved_tensors
        do = do.contiguous()
        intra, q_decay, k_decay, chunk_decay = _decays(log_g, q.shape[-2])
        intra, q_decay, k_decay = intra[:, None], q_decay[:, None, :, None], k_decay[:, None, :, None]
        # Gradient w.r.t. the state leaving each chunk: dS_out[n] = dS_in[n+1], run backwards from dfinal.
        dkv, dstate = _carry(_bmm((q * q_decay).transpose(-1, -2), do), dfinal, chunk_decay, reverse=True)
        dq = _bmm(do, incoming.transpose(-1, -2)).mul_(q_decay)
        dk = _bmm(v, dkv.transpose(-1, -2)).mul_(k_decay)
        dv = _bmm(k * k_decay, dkv)
        # One C x C batch at a time (they are T x T in parallel mode): score gradients, then scores.
        dscores = _bmm(do, v.transpose(-1, -2)).mul_(intra)
        _bmm(dscores, k, out=dq)
        _bmm(dscores.transpose(-1, -2), q, out=dk)
        del dscores
        scores = _bmm(q, k.transpose(-1, -2)).mul_(intra)
        _bmm(scores.transpose(-1, -2), do, out=dv)
        return dq, dk, dv, dstate, None


def _chunks(q: Tensor, k: Tensor, v: Tensor, log_g: Tensor, state: Tensor | None) -> tuple[Tensor, Tensor]:
    """Retention over ``q, k: [B, H, N, C, Dk]``, ``v: [B, H, N, C, Dv]`` from ``state [B, H, Dk, Dv]``."""
    if state is None:
        B, H = q.shape[:2]
        state = q.new_zeros(B, H, q.shape[-1], v.shape[-1])
    return _Chunks.apply(q, k, v, state, log_g)


def _recurrent(q: Tensor, k: Tensor, v: Tensor, gamma: Tensor, state: Tensor | None) -> tuple[Tensor, Tensor]:
    """Token by token: ``S_t = gamma S_{t-1} + k_t^T v_t``, ``o_t = q_t S_t``. ``q, k, v: [B, T, H, D]``."""
    B, T, H, Dk = q.shape
    if state is None:
        state = q.new_zeros(B, H, Dk, v.shape[-1])
    g = gamma[:, None, None]
    outs = []
    # Split once with unbind: indexing q[:, t] in the loop would make autograd zero-fill and add a
    # full-size gradient per token (O(T^2) work in the backward).
    for q_t, k_t, v_t in zip(q.unbind(1), k.unbind(1), v.unbind(1), strict=True):
        state = g * state + k_t[..., :, None] * v_t[..., None, :]
        outs.append((q_t[..., None, :] @ state).squeeze(-2))  # (B, H, Dv)
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
    if mode == "recurrent":
        o, state = _recurrent(q, k, v, gamma.to(acc), initial_state)
        return o.to(out_dtype), state

    # log(gamma) from the float64 gamma: a tiny gamma (say 1e-300) rounds to 0 in float32, and
    # log(0) = -inf would turn the exponent-0 decays into 0 * inf = NaN.
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
