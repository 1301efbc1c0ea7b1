"""Retention in pure torch: the reference backend, differentiable by autograd.

All three modes share one building block, ``_chunks``, which handles N equal chunks of C tokens at
once: the parallel form is a single chunk of T tokens; the chunkwise form is N full chunks plus one
tail chunk (so any chunk size works, dividing T or not). Every decay power is ``exp(e * log gamma)``
with ``0 <= e <= C``, never ``gamma^(-t)``, so nothing overflows on long sequences.

Causality with non-finite inputs. A NaN or inf at position t leaves every output before t as it was, in every
mode, and makes the outputs from t on non-finite; with gradients, it leaves the gradients of the inputs before t
as they were too. With gradients, the computation runs on the finite parts of q, k, v and the non-finite
entries are marked NaN where they reach (``mixers.backends.nonfinite``), so nothing non-finite meets a zero in
the backward. Without gradients, the forward excludes later positions itself, without copying the inputs: the
scores of later keys are zeroed by ``tril_`` (which writes zeros), and the ``C x C`` product takes the values
with non-finite entries zeroed, those entries added back from their own position on (``_intra``; skipped on the
CPU when the values are all finite); token by token, nothing later is ever read.

Memory. Without gradients, chunkwise mode runs ``GROUP`` chunks at a time (``_streamed``), so besides the
inputs and the output it keeps a bounded number of ``[B, H, Dk, Dv]`` states whatever T is. With gradients
it keeps the state entering every chunk for the backward pass (``N`` states); inside
``checkpoint_states()`` it keeps one state every few chunks and recomputes the others in the backward.
Recurrent mode with gradients keeps no state per token (``_Recurrent``): its backward recomputes the states
in a forward sweep (for ``dq``) and runs the state's gradient in a backward sweep (for ``dk``, ``dv``), two
``[B, H, Dk, Dv]`` tensors alive whatever T is, as fla's fused recurrent kernel does.

Packed sequences (``cu_seqlens``, a ``mixers.packing.Packing``; the backend is registered with ``packs=True``).
q, k, v ``[1, T, H, D]`` hold ``n`` sequences back to back, ``initial_state`` is None or ``[n, H, Dk, Dv]``, and
the final state has a row per sequence: each sequence computed from its own initial row as if it ran alone,
nothing crossing a boundary, an empty sequence giving its initial state back (zeros if none). There is no loop
over sequences: every mode cuts each sequence into chunks of its own, from its first token (recurrent mode:
single tokens; chunkwise mode: ``chunk_size`` tokens; parallel mode: one chunk per sequence), laid out step-major
(``mixers.backends.ragged``): step j holds the j-th chunk of every sequence that has one. One pass is then as
many batched steps as the longest sequence has chunks, each advancing the state rows of the sequences still
running (``_ragged_carry``: the other rows untouched, so nothing multiplies a finished sequence's state by zero
and nothing needs resetting; a state goes from a chunk's entering slot to the next chunk's in one pass).
Sequences no longer than a chunk (all of them in parallel mode) are one chunk each, padded with those of similar
lengths (``ragged.buckets``). A sequence's last chunk is filled up by repeating its last token: causality hides
those slots from every real token, their ``k_decay`` is 0 (the decays are per chunk: ``gamma^(L-1-j)`` over the L
tokens a chunk holds), and their outputs are dropped. The same ``_Chunks`` and ``_Recurrent`` compute it, so the
hand-written and memory-bounded backwards, the float32 accumulation, the decays' exponents in ``0..C`` and
``checkpoint_states`` (every ``every``-th chunk of each sequence) hold as for one sequence. Without gradients,
``PACKED_GROUP`` chunks run at a time, gathered from the packed inputs (no copy of the whole row); with gradients,
the chunks of every bucket are gathered from q, k, v in one pass and their outputs put back in one
(``Buckets.gather_heads``, ``scatter_heads``: their backwards are one pass too, not autograd's zero-filled row and
scatter-add per gather). Non-finite inputs are excluded as above, their reach ending at their sequence's end
(``nonfinite.finite_parts`` with the packing).

Inputs arrive validated by ``mixers.functional.retention``; ``gamma`` is a float64 tensor ``[H]``.
Computation runs in float32 (float64 for float64 inputs); ``o`` is cast back to the input dtype.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mixers.backends import nonfinite
from mixers.backends.ragged import Ragged, buckets, ragged
from mixers.catalogue import Backend, BackendRegistrar
from mixers.hookspecs import hookimpl
from mixers.ops.checks import state_dtype

if TYPE_CHECKING:  # pragma: no cover
    from mixers.packing import Packing

GROUP = 8  # chunks computed at once without gradients: at most 2 * GROUP + 1 states are alive
PACKED_GROUP = 16  # chunks of a packed row computed at once without gradients (their working set stays in cache)

_OFF = 0
_CHECKPOINT_EVERY: contextvars.ContextVar[int | None] = contextvars.ContextVar("checkpoint_every", default=_OFF)


@contextlib.contextmanager
def checkpoint_states(every: int | None = None) -> Iterator[None]:
    """Within this context, chunkwise retention with gradients keeps the state entering only every
    ``every``-th chunk for the backward pass, which recomputes the others from it (default: about
    ``sqrt(N)`` of the ``N`` chunks, so about ``2 sqrt(N)`` states are alive instead of ``N``).

    It applies to the torch backend of ``retention`` and of ``linear_attention`` (which runs this one), in
    chunkwise mode, to the forward calls made inside the context (their backward may run after it). The
    results are the same; the backward recomputes each chunk's share of the state once more.
    """
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise ValueError(f"every must be a positive int (chunks between kept states) or None, got {every!r}")
    token = _CHECKPOINT_EVERY.set(every)
    try:
        yield
    finally:
        _CHECKPOINT_EVERY.reset(token)


@torch._dynamo.assume_constant_result
def _checkpoint_setting() -> int | None:
    """The ``checkpoint_states`` setting; a compiled graph reads it once, when it is traced (dynamo cannot
    trace a ContextVar), so a graph compiled outside ``checkpoint_states()`` keeps every state."""
    return _CHECKPOINT_EVERY.get()


def _checkpoint_every(N: int) -> int | None:
    """Chunks between kept states in a chunkwise pass over N chunks with gradients; ``None``: keep all."""
    every = _checkpoint_setting()
    if every == _OFF:
        return None
    return max(1, math.isqrt(N - 1) + 1) if every is None else every


def _decays(log_g: Tensor, C: int, lengths: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Decay factors for chunks of C tokens, from ``log_g = log gamma`` ``[H]``.

    Returns ``intra [H, C, C]`` (``gamma^(i-j)`` for ``i >= j``, else 0), ``q_decay [H, C]``
    (``gamma^(i+1)``: how much the incoming state reaches token i), ``k_decay [H, 1, C]``
    (``gamma^(C-1-j)``: how much token j reaches the outgoing state) and ``chunk_decay [H]``
    (``gamma^C``). With ``lengths [N]`` (chunks holding ``L = lengths[n]`` tokens in their first slots), per
    chunk: ``k_decay [H, N, C]`` (``gamma^(L-1-j)``, and 0 in the empty slots ``j >= L``: they reach no state) and
    ``chunk_decay [H, N]`` (``gamma^L``).
    """
    i = torch.arange(C, device=log_g.device, dtype=log_g.dtype)
    diff = i[:, None] - i[None, :]
    # Built in place: in parallel mode C = T and every [H, C, C] temporary would cost as much as the scores.
    intra = torch.mul(diff.clamp(min=0), log_g[:, None, None]).exp_().masked_fill_(diff < 0, 0)
    q_decay = torch.exp((i + 1) * log_g[:, None])
    if lengths is None:
        return intra, q_decay, torch.exp((C - 1 - i) * log_g[:, None])[:, None], torch.exp(C * log_g)
    L = lengths.to(log_g.dtype)[:, None]
    k_decay = torch.exp((L - 1 - i).clamp(min=0) * log_g[:, None, None]).masked_fill_(i >= L, 0)
    return intra, q_decay, k_decay, torch.exp(L[:, 0] * log_g[:, None])


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


def _scores(a: Tensor, b: Tensor, intra: Tensor) -> Tensor:
    """``(a b^T) * D`` over chunks, its future (``j > i``) entries exactly zero whatever ``a`` and ``b`` hold:
    ``tril_`` writes zeros, where D's zeros would keep the NaN of a later key's non-finite product."""
    return _bmm(a, b.transpose(-1, -2)).mul_(intra).tril_()


def _intra(scores: Tensor, v: Tensor, out: Tensor, exclude: bool) -> Tensor:
    """``out += scores @ v`` with the future values excluded: ``scores`` is zero right of the diagonal, but
    ``0 * NaN`` would still be NaN. So, with ``exclude``, the product takes ``v`` with its non-finite entries
    zeroed, and those entries are added back to every row from their own position on (a running sum over
    the chunk): non-finite values reach exactly the outputs at and after them. With finite ``v`` that
    changes nothing (it adds zeros), so ``exclude`` may be off when ``v`` is known to be finite."""
    if not exclude:
        return _bmm(scores, v, out=out)
    finite = torch.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0)
    _bmm(scores, finite, out=out)
    return out.add_(v.sub(finite).cumsum_(-2))


Carry = Callable[..., tuple[Tensor, Tensor]]  # _carry's signature: (kv, state, chunk_decay, *, reverse=False)
Decays = tuple[Tensor, Tensor, Tensor, Tensor]  # _decays's: (intra, q_decay, k_decay, chunk_decay)


def _forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    state: Tensor,
    decays: tuple[Tensor, Tensor, Tensor, Tensor],
    exclude: bool,
    carry: Carry = _carry,
) -> tuple[Tensor, Tensor, Tensor]:
    """Retention over chunks ``q, k: [B, H, N, C, Dk]``, ``v: [B, H, N, C, Dv]`` from ``state`` (``exclude``:
    as ``_intra``'s; ``carry``: how the states pass from chunk to chunk, ``_carry`` or ``_ragged_carry``).

    Returns ``(o [B, H, N, C, Dv], the state entering each chunk [B, H, N, Dk, Dv], the final state)``.
    """
    intra, q_decay, k_decay, chunk_decay = decays
    scores = _scores(q, k, intra[:, None])  # (B, H, N, C, C)
    kv = _bmm((k * k_decay[..., None]).transpose(-1, -2), v)  # chunk's share of the state (B, H, N, Dk, Dv)
    incoming, final = carry(kv, state, chunk_decay)
    del kv
    o = _intra(scores, v, _bmm(q * q_decay[:, None, :, None], incoming), exclude)  # (B, H, N, C, Dv)
    return o, incoming, final


def _backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    do: Tensor,
    incoming: Tensor,
    dfinal: Tensor,
    decays: tuple[Tensor, Tensor, Tensor, Tensor],
    carry: Carry = _carry,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients ``(dq, dk, dv, d state)`` of ``_forward`` over chunks, given ``do``, the state entering each
    chunk and the gradient of the final state."""
    intra, q_decay, k_decay, chunk_decay = decays
    intra, q_decay, k_decay = intra[:, None], q_decay[:, None, :, None], k_decay[..., None]
    # Gradient w.r.t. the state leaving each chunk: dS_out[n] = dS_in[n+1], run backwards from dfinal.
    dkv, dstate = carry(_bmm((q * q_decay).transpose(-1, -2), do), dfinal, chunk_decay, reverse=True)
    dq = _bmm(do, incoming.transpose(-1, -2)).mul_(q_decay)
    dk = _bmm(v, dkv.transpose(-1, -2)).mul_(k_decay)
    dv = _bmm(k * k_decay, dkv)
    del dkv
    # One C x C batch at a time (they are T x T in parallel mode): score gradients, then scores.
    dscores = _scores(do, v, intra)
    _bmm(dscores, k, out=dq)
    _bmm(dscores.transpose(-1, -2), q, out=dk)
    del dscores
    scores = _scores(q, k, intra)
    _bmm(scores.transpose(-1, -2), do, out=dv)
    return dq, dk, dv, dstate


class _Chunks(torch.autograd.Function):
    """Retention over N equal chunks ``q, k: [B, H, N, C, Dk]``, ``v: [B, H, N, C, Dv]`` from ``state``.

    Inside a chunk: ``o = ((q k^T) * D) v``; across chunks: ``o += (q * gamma^(i+1)) S_in``, with
    ``S_out = gamma^C S_in + k^T (v * gamma^(C-1-j))``. The backward is written out by hand so that it
    saves only q, k, v and the incoming states and recomputes the ``C x C`` scores, instead of autograd
    keeping every intermediate (and zero-filling a full gradient buffer per chunk of the state loop).
    With ``every``, it runs ``every`` chunks at a time and saves only the state entering each such group;
    the backward, group by group from the last, recomputes the group's states from it.
    With a ``Ragged`` ``layout`` (packed sequences): ``B = 1``, the chunks are the layout's, ``state`` has a row
    per sequence (in the layout's row order) and ``every`` counts steps (chunks of each sequence); a group saves
    the rows of the sequences it advances only.
    Inputs must be contiguous.
    """

    @staticmethod
    def forward(
        ctx,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        state: Tensor,
        log_g: Tensor,
        every: int | None,
        exclude: bool,
        layout: Ragged | None,
    ) -> tuple[Tensor, Tensor]:
        decays = _decays(log_g, q.shape[-2], None if layout is None else layout.lengths)
        if every is None:
            o, saved, final = _forward(q, k, v, state, decays, exclude, _carry_of(layout))
        else:
            o = q.new_empty(*q.shape[:-1], v.shape[-1])
            starts = []
            for a, b, carry, part, rows in _groups(q.shape[2], every, decays, layout):
                starts.append(state[:rows])
                group = (x[:, :, a:b].contiguous() for x in (q, k, v))  # (one copy, not one per product)
                o[:, :, a:b], _, state = _forward(*group, state, part, exclude, carry)
            saved = torch.stack(starts, dim=2) if layout is None else torch.cat(starts)  # (one tensor, compact)
            final = state
        ctx.every, ctx.layout = every, layout
        ctx.save_for_backward(q, k, v, saved, log_g)
        return o, final

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do: Tensor, dfinal: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, saved, log_g = ctx.saved_tensors
        do = do.contiguous()
        every, layout = ctx.every, ctx.layout
        decays = _decays(log_g, q.shape[-2], None if layout is None else layout.lengths)
        if every is None:
            dq, dk, dv, dstate = _backward(q, k, v, do, saved, dfinal, decays, _carry_of(layout))
            return dq, dk, dv, dstate, None, None, None, None
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        dstate = dfinal
        groups = _groups(q.shape[2], every, decays, layout)
        if layout is None:
            starts = saved.unbind(2)
        else:
            starts = saved.split([rows for *_, rows in groups])
        for (a, b, carry, part, _), start in zip(reversed(groups), reversed(starts), strict=True):
            qg, kg, vg, dog = (x[:, :, a:b].contiguous() for x in (q, k, v, do))
            incoming, _ = carry(_bmm((kg * part[2][..., None]).transpose(-1, -2), vg), start, part[3])
            dq[:, :, a:b], dk[:, :, a:b], dv[:, :, a:b], dstate = _backward(
                qg, kg, vg, dog, incoming, dstate, part, carry
            )
        return dq, dk, dv, dstate, None, None, None, None


def _groups(
    N: int, every: int, decays: Decays, layout: Ragged | None, *, by_steps: bool = True
) -> list[tuple[int, int, Carry, Decays, int | None]]:
    """Consecutive chunks ``a..b-1`` with their carry and decays, and the number of leading state rows they advance
    (``None``: all), ``(a, b, carry, decays, rows)``: ``every`` chunks at a time, or for a ``layout``, ``every`` of
    its steps (``every`` chunks of each sequence; or, not ``by_steps``, ``every`` of its chunks)."""
    if layout is None:
        return [(n0, min(n0 + every, N), _carry, decays, None) for n0 in range(0, N, every)]
    starts = [a for a, _ in layout.steps[::every]] if by_steps else list(range(0, N, every))
    intra, q_decay, k_decay, chunk_decay = decays
    out = []
    for a, b in zip(starts, [*starts[1:], N], strict=True):
        clipped = ((max(s, a), max(s, a) - s, min(s + m, b) - max(s, a)) for s, m in layout.steps)
        spans = tuple((s - a, r, m) for s, r, m in clipped if m > 0)
        part = (intra, q_decay, k_decay[:, a:b], chunk_decay[:, a:b])
        out.append((a, b, functools.partial(_ragged_carry, spans), part, max(r + m for _, r, m in spans)))
    return out


def _carry_of(layout: Ragged | None) -> Carry:
    """How states pass from chunk to chunk: along each row (unpacked), or along each sequence of ``layout``."""
    return _carry if layout is None else functools.partial(_ragged_carry, tuple((a, 0, m) for a, m in layout.steps))


def _chunks(
    q: Tensor, k: Tensor, v: Tensor, log_g: Tensor, state: Tensor | None, exclude: bool, every: int | None = None
) -> tuple[Tensor, Tensor]:
    """Retention over ``q, k: [B, H, N, C, Dk]``, ``v: [B, H, N, C, Dv]`` from ``state [B, H, Dk, Dv]``
    (``exclude``: as ``_intra``'s)."""
    if state is None:
        B, H = q.shape[:2]
        state = q.new_zeros(B, H, q.shape[-1], v.shape[-1])
    return _Chunks.apply(q, k, v, state, log_g, every, exclude, None)


def _ragged_carry(
    spans: tuple[tuple[int, int, int], ...], kv: Tensor, state: Tensor, chunk_decay: Tensor, *, reverse: bool = False
) -> tuple[Tensor, Tensor]:
    """``_carry`` over chunks of a ``Ragged`` layout: ``kv [1, H, N, Dk, Dv]``, ``chunk_decay [H, N]``, ``state
    [n, H, Dk, Dv]`` (a row per sequence); span ``(a, r, m)`` advances rows ``r..r+m-1`` by chunks ``a..a+m-1``.
    The rows a span does not reach are left as they are, never scaled by zero (a NaN in a finished sequence
    stays in it). A row's state passes from one span to the next inside ``before`` (one pass over the states:
    ``before[next] = decay * before + kv``); ``state`` takes the rows that leave the spans, and gives those that
    join them."""
    before = torch.empty_like(kv)
    state = state.clone()
    decay = chunk_decay[..., None, None]

    def advance(c: int, n: int, out: Tensor) -> None:  # the states leaving chunks c..c+n-1
        torch.addcmul(kv[0, :, c : c + n], decay[:, c : c + n], before[0, :, c : c + n], out=out)

    def rows(r0: int, r1: int, lo: int, hi: int) -> tuple[tuple[int, int], ...]:  # rows r0..r1-1 not in lo..hi-1
        return tuple((s, e) for s, e in ((r0, min(lo, r1)), (max(hi, r0), r1)) if s < e)

    last = None
    for a, r, m in reversed(spans) if reverse else spans:
        lo = hi = r
        if last is not None:  # the rows the last span advanced too: their state goes straight to this span's
            la, lr, lm = last
            lo, hi = max(r, lr), min(r + m, lr + lm)
            hi = max(lo, hi)
            for s, e in rows(lr, lr + lm, lo, hi):
                advance(la + s - lr, e - s, state[s:e].transpose(0, 1))
            if lo < hi:
                advance(la + lo - lr, hi - lo, before[0, :, a + lo - r : a + hi - r])
        for s, e in rows(r, r + m, lo, hi):
            before[0, :, a + s - r : a + e - r] = state[s:e].transpose(0, 1)
        last = (a, r, m)
    if last is not None:
        la, lr, lm = last
        advance(la, lm, state[lr : lr + lm].transpose(0, 1))
    return before, state


def _streamed(q: Tensor, k: Tensor, v: Tensor, log_g: Tensor, state: Tensor | None, C: int) -> tuple[Tensor, Tensor]:
    """Chunkwise retention without autograd, ``GROUP`` chunks at a time, from ``q, k, v [B, T, H, D]`` as
    given: besides the inputs and the output only one group's operands (in the computing dtype and layout),
    scores and states, and the running state, are alive, whatever T is. Computes what ``_chunks`` does, chunk
    for chunk."""
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    acc = log_g.dtype
    o = v.new_empty(B, H, T, Dv)  # the layout the other paths return, transposed
    if state is None:
        state = q.new_zeros(B, H, Dk, Dv, dtype=acc)
    decays = _decays(log_g, C)
    exclude = nonfinite.may_be_nonfinite(v)
    full = T // C * C
    pieces = [(t0, min(t0 + GROUP * C, full), C) for t0 in range(0, full, GROUP * C)]
    if full < T:
        pieces.append((full, T, T - full))
        decays_tail = _decays(log_g, T - full)
    for t0, t1, c in pieces:
        n = (t1 - t0) // c
        q_, k_, v_ = (x[:, t0:t1].transpose(1, 2).to(acc, memory_format=torch.contiguous_format) for x in (q, k, v))
        og, _, state = _forward(
            q_.view(B, H, n, c, Dk),
            k_.view(B, H, n, c, Dk),
            v_.view(B, H, n, c, Dv),
            state,
            decays if c == C else decays_tail,
            exclude,
        )
        o[:, :, t0:t1] = og.view(B, H, t1 - t0, Dv)
    return o.transpose(1, 2), state


def _steps(q: Tensor, k: Tensor, v: Tensor, g: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    """Token by token: ``S_t = gamma S_{t-1} + k_t^T v_t``, ``o_t = q_t S_t``. ``q, k, v: [B, T, H, D]``,
    ``g = gamma [H, 1, 1]``."""
    outs = []
    for q_t, k_t, v_t in zip(q.unbind(1), k.unbind(1), v.unbind(1), strict=True):
        state = g * state + k_t[..., :, None] * v_t[..., None, :]
        outs.append((q_t[..., None, :] @ state).squeeze(-2))  # (B, H, Dv)
    return torch.stack(outs, dim=1), state


class _Recurrent(torch.autograd.Function):
    """Recurrent retention whose backward keeps no state per token (autograd through ``_steps`` would keep
    every ``S_t``, T x ``[B, H, Dk, Dv]``). With ``G_t`` the gradient of ``S_t`` (``G_T`` that of the final
    state plus ``q_T^T do_T``; ``G_t = gamma G_{t+1} + q_t^T do_t``): ``dq_t = do_t S_t^T`` needs the states,
    recomputed in a forward sweep; ``dk_t = G_t v_t`` and ``dv_t = k_t G_t`` need only ``G_t``, run backwards;
    the initial state's gradient is ``gamma G_1``. It saves q, k, v and the initial state. Each sweep updates one
    state in place and writes each token's result into a tensor made beforehand: no allocation lives from one
    token to the next, which on the CPU would scatter the freed states and grow the heap with T.

    With ``steps`` (packed sequences, a ``Ragged`` layout of single tokens): q, k, v ``[T, H, D]`` step-major and
    ``state`` a row per sequence; step ``(a, m)`` is the next token of rows ``0..m-1``, tokens ``a..a+m-1``."""

    @staticmethod
    def forward(
        ctx, q: Tensor, k: Tensor, v: Tensor, state: Tensor, g: Tensor, steps: tuple[tuple[int, int], ...] | None
    ) -> tuple[Tensor, Tensor]:
        ctx.save_for_backward(q, k, v, state, g)
        ctx.steps = steps
        S = state.clone()
        o, outs = _results(q, v.shape[-1], steps)
        for q_t, k_t, v_t, o_t in zip(*(_by_step(x, steps) for x in (q, k, v)), outs, strict=True):
            S_t = S[: q_t.shape[0]]  # the rows this step advances (all of them unpacked)
            S_t.mul_(g).addcmul_(k_t[..., :, None], v_t[..., None, :])
            torch.matmul(q_t[..., None, :], S_t, out=o_t[..., None, :])
        return (o.transpose(0, 1) if steps is None else o), S

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do: Tensor, dfinal: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, state, g = ctx.saved_tensors
        steps = ctx.steps
        qs, ks, vs, dos = (_by_step(x, steps) for x in (q, k, v, do))
        (dq, dqs), (dk, dks), (dv, dvs) = (_results(x, x.shape[-1], steps) for x in (q, k, v))
        S = state.clone()
        for k_t, v_t, do_t, dq_t in zip(ks, vs, dos, dqs, strict=True):
            S_t = S[: k_t.shape[0]]
            S_t.mul_(g).addcmul_(k_t[..., :, None], v_t[..., None, :])
            torch.matmul(do_t[..., None, :], S_t.transpose(-1, -2), out=dq_t[..., None, :])
        grad = dfinal.clone()
        for t in range(len(qs) - 1, -1, -1):
            G = grad[: qs[t].shape[0]]
            G.addcmul_(qs[t][..., :, None], dos[t][..., None, :])  # G_t
            torch.matmul(G, vs[t][..., :, None], out=dks[t][..., :, None])
            torch.matmul(ks[t][..., None, :], G, out=dvs[t][..., None, :])
            G.mul_(g)
        dstate = grad if ctx.needs_input_grad[3] else None
        if steps is None:
            dq, dk, dv = dq.transpose(0, 1), dk.transpose(0, 1), dv.transpose(0, 1)
        return dq, dk, dv, dstate, None, None


def _by_step(x: Tensor, steps: tuple[tuple[int, int], ...] | None) -> list[Tensor] | tuple[Tensor, ...]:
    """The tokens of each step: ``x [B, T, ...]`` by time, or (packed) ``x [T, ...]`` step-major by ``steps``."""
    return x.unbind(1) if steps is None else [x[a : a + m] for a, m in steps]


def _results(
    x: Tensor, width: int, steps: tuple[tuple[int, int], ...] | None
) -> tuple[Tensor, list[Tensor] | tuple[Tensor, ...]]:
    """A buffer for a result per token of ``x`` (last dim ``width``) and its views per step: time first
    (``[T, B, ...]``, so each step's block is contiguous), or step-major as ``x`` is when packed."""
    if steps is None:
        buffer = x.new_empty(x.shape[1], x.shape[0], *x.shape[2:-1], width)
        return buffer, buffer.unbind(0)
    buffer = x.new_empty(*x.shape[:-1], width)
    return buffer, _by_step(buffer, steps)


def _recurrent(q: Tensor, k: Tensor, v: Tensor, gamma: Tensor, state: Tensor | None) -> tuple[Tensor, Tensor]:
    """Token by token: ``S_t = gamma S_{t-1} + k_t^T v_t``, ``o_t = q_t S_t``. ``q, k, v: [B, T, H, D]``; with
    gradients, through ``_Recurrent``."""
    B, T, H, Dk = q.shape
    if state is None:
        state = q.new_zeros(B, H, Dk, v.shape[-1])
    g = gamma[:, None, None]
    if nonfinite.recording(q, k, v, state):
        return _Recurrent.apply(q, k, v, state, g, None)
    return _steps(q, k, v, g, state)


def _packed(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gamma: Tensor,
    log_g: Tensor,
    state: Tensor | None,
    packing: Packing,
    mode: str,
    chunk_size: int | None,
    tracked: bool,
) -> tuple[Tensor, Tensor]:
    """Retention over the packed sequences of ``q, k, v [1, T, H, D]`` (T > 0) from ``state [n, H, Dk, Dv]`` or
    zeros (module docstring): recurrent mode on single tokens, chunkwise mode on chunks of ``chunk_size``, parallel
    mode on one chunk per sequence, sequences of similar lengths together (``buckets``). Returns ``o`` in the
    computing dtype and the final states."""
    acc = log_g.dtype
    H, Dk, Dv = q.shape[2], q.shape[3], v.shape[3]
    initial = q.new_zeros(packing.n, H, Dk, Dv, dtype=acc) if state is None else state
    if mode == "recurrent" or not tracked:  # (gathers read (token, head) rows: one copy here, not one per gather)
        q, k, v = (x.contiguous() for x in (q, k, v))
    if mode == "recurrent":  # token by token, every sequence at once
        layout = ragged(packing, 1)
        q_, k_, v_ = (layout.gather(x, dtype=acc) for x in (q, k, v))  # [T, H, D] step-major
        g = gamma.to(acc)[:, None, None]
        o, final = _Recurrent.apply(q_, k_, v_, initial.index_select(0, layout.order), g, layout.steps)
        return layout.scatter(o)[None], initial.index_copy(0, layout.order, final)  # (empty ones: their initial)
    # (a sequence no longer than a chunk is one chunk: padded with those of similar lengths)
    groups = buckets(packing, chunk_size if mode == "chunkwise" else None)
    layouts = groups.layouts
    rows = torch.cat([layout.order for layout in layouts])
    starts = [initial.index_select(0, layout.order) for layout in layouts]
    if not tracked:  # every layout writes its tokens' outputs in place
        out = q.new_empty(q.shape[1] + 1, H, Dv, dtype=acc)
        exclude = nonfinite.may_be_nonfinite(v)
        finals = [
            _streamed_layout(q, k, v, log_g, s, layout, exclude, out) for s, layout in zip(starts, layouts, strict=True)
        ]
        return out[None, :-1], initial.index_copy(0, rows, torch.cat(finals))
    # With gradients (on finite inputs): the layouts' chunks gathered in one pass (of q, k, v as given), their
    # results put back in one, and so their gradients.
    outs, finals = [], []
    for layout, start, *qkv in zip(layouts, starts, *(groups.gather_heads(x, acc) for x in (q, k, v)), strict=True):
        every = _checkpoint_every(len(layout.steps)) if mode == "chunkwise" else None
        o, final = _Chunks.apply(*qkv, start, log_g, every, False, layout)
        outs.append(o)
        finals.append(final)
    return groups.scatter_heads(tuple(outs))[None], initial.index_copy(0, rows, torch.cat(finals))


def _streamed_layout(
    q: Tensor, k: Tensor, v: Tensor, log_g: Tensor, state: Tensor, layout: Ragged, exclude: bool, out: Tensor
) -> Tensor:
    """Retention over the sequences of ``layout`` from ``state`` (a row per sequence, in the layout's order) without
    gradients, in chunkwise and parallel modes: ``PACKED_GROUP`` chunks at a time (their working set stays in
    cache), gathered from the inputs, their outputs written at their tokens' rows of ``out`` (``[T + 1, H, Dv]``);
    returns the final states (``exclude``: as ``_intra``'s)."""
    acc = log_g.dtype
    decays = _decays(log_g, layout.C, layout.lengths)
    for a, b, carry, part, _ in _groups(layout.chunks, PACKED_GROUP, decays, layout, by_steps=False):
        group = (layout.gather_heads(x, a, b, acc) for x in (q, k, v))
        o, _, state = _forward(*group, state, part, exclude, carry)
        layout.put_heads(o, out, a)
    return state


def retention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gamma: Tensor,
    *,
    mode: str,
    chunk_size: int | None,
    initial_state: Tensor | None,
    cu_seqlens: Packing | None = None,
) -> tuple[Tensor, Tensor]:
    """The torch backend of ``mixers.functional.retention`` (inputs already validated). With gradients, it
    computes on the finite parts of q, k, v and marks where the others reach (module docstring).

    ``cu_seqlens`` (``packs=True``): q, k, v ``[1, T, H, D]`` hold ``cu_seqlens.n`` sequences back to back,
    ``initial_state`` is None or ``[n, H, Dk, Dv]``; returns ``o [1, T, H, Dv]`` and the final states ``[n, H, Dk,
    Dv]``, each sequence computed from its own initial row alone, in one pass (module docstring)."""
    found = None
    if nonfinite.recording(q, k, v, initial_state):
        (q, k, v), found = nonfinite.finite_parts(q, k, v, cu_seqlens)
    o, state = compute(
        q, k, v, gamma, mode=mode, chunk_size=chunk_size, initial_state=initial_state, cu_seqlens=cu_seqlens
    )
    return nonfinite.marked(found, o, state)


def compute(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gamma: Tensor,
    *,
    mode: str,
    chunk_size: int | None,
    initial_state: Tensor | None,
    cu_seqlens: Packing | None = None,
) -> tuple[Tensor, Tensor]:
    """Retention as ``retention`` computes it, but with gradients the inputs must be finite: the caller
    passes their finite parts (``nonfinite.finite_parts``), as ``retention`` and ``linear_attention`` do."""
    out_dtype = q.dtype
    acc = state_dtype(q.dtype)
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    if T == 0:
        rows = B if cu_seqlens is None else cu_seqlens.n
        state = initial_state if initial_state is not None else q.new_zeros(rows, H, Dk, Dv, dtype=acc)
        return v.new_empty(B, 0, H, Dv), state
    # log(gamma) from the float64 gamma: a tiny gamma (say 1e-300) rounds to 0 in float32, and
    # log(0) = -inf would turn the exponent-0 decays into 0 * inf = NaN.
    log_g = torch.log(gamma.to(torch.float64)).to(acc)
    tracked = nonfinite.recording(q, k, v, initial_state)
    if cu_seqlens is not None:
        o, state = _packed(q, k, v, gamma, log_g, initial_state, cu_seqlens, mode, chunk_size, tracked)
        return o.to(out_dtype), state
    if mode == "chunkwise" and not tracked:
        return _streamed(q, k, v, log_g, initial_state, min(chunk_size, T))

    q, k, v = q.to(acc), k.to(acc), v.to(acc)
    if mode == "recurrent":
        o, state = _recurrent(q, k, v, gamma.to(acc), initial_state)
        return o.to(out_dtype), state

    exclude = not tracked and nonfinite.may_be_nonfinite(v)  # (with gradients, the inputs are finite)
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
            exclude,
            _checkpoint_every(N) if mode == "chunkwise" else None,
        )
        pieces.append(o.reshape(B, H, full, Dv))
    if tail:
        o, state = _chunks(
            qh[:, :, full:].unsqueeze(2),
            kh[:, :, full:].unsqueeze(2),
            vh[:, :, full:].unsqueeze(2),
            log_g,
            state,
            exclude,
        )
        pieces.append(o.reshape(B, H, tail, Dv))
    o = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)
    return o.transpose(1, 2).to(out_dtype), state


@hookimpl
def register_backends(register: BackendRegistrar) -> None:
    register(
        Backend(
            op="retention",
            name="torch",
            fn=retention,
            priority=0,
            packs=True,
            description="pure torch; any device and dtype; differentiable by autograd",
        )
    )
