"""Gated retention in pure torch: the reference backend, differentiable with respect to q, k, v, g and the state.

Chunkwise form. Inside a chunk of C tokens every decay is a sum of the chunk's own log decays: the decay between
tokens j < i is ``exp(g_{j+1} + ... + g_i)``, computed as a masked running sum over a ``[C, C]`` grid (so it is
never the difference of two long running sums, which would lose the small ones next to a large total and turn a
-inf into NaN), the incoming state reaches token i by ``exp(g_1 + ... + g_i)``, token j reaches the outgoing state
by ``exp(g_{j+1} + ... + g_C)``. Across chunks the state is multiplied by the chunk's total decay, one factor per
chunk: no exponential of a sum longer than a chunk is ever taken, so strong decays (g down to -20 per token, where
a running sum reaches -20 C) and long sequences (64k tokens) stay exact to rounding. Parallel mode is one chunk of
T tokens; chunkwise mode takes any chunk size, the last chunk holding the rest.

Gradient of the decays. The output depends on g only through the running sums ``b_i = g_1 + ... + g_i``: the
derivative with respect to ``b_i`` is ``q_i . dq_i - k_i . dk_i`` (token i as a query, as a key), plus
``<dS_T, S_T>`` for the last one (the final state carries ``b_T``). So ``dg_t = sum_{i>=t} (q_i . dq_i -
k_i . dk_i) + <dS_T, S_T>``: the hand-written backward computes dq, dk, dv and the state's gradient as for
retention (recomputing the ``C x C`` scores, one group of chunks at a time) and gets dg from them in a float64
running sum, with no extra pass over the chunks. The same identity gives the recurrent backward its dg.

Memory. Without gradients the chunks run ``GROUP`` at a time: besides the inputs and the output only one group's
operands, scores and decays and the running state are alive, whatever T is. With gradients the state entering
each chunk is kept (N states). Recurrent mode with gradients keeps no state per token: its backward recomputes the
states in a forward sweep (for dq) and runs the state's gradient backwards (for dk, dv), two ``[B, H, Dk, Dv]``
tensors alive whatever T is.

Packed sequences (``cu_seqlens``, ``packs=True``): the sequences of a packed row are laid out as padded batches of
similar lengths (``mixers.backends.ragged.buckets``: one row per sequence, as long as the longest of its group),
and each batch runs as above from its sequences' own state rows, in one call per group (no loop over sequences).
A padding slot gets k = 0 and g = 0, so it neither enters nor decays the state, and its output is dropped.

Non-finite inputs. q, k, v and g are computed on their finite parts and NaN is added where a non-finite entry
reaches (``mixers.backends.nonfinite``): a NaN or +inf in g reaches its head's outputs from its position on and its
head's state (within its sequence). A -inf in g is a valid log decay, not a fault: the state is forgotten there.

Inputs arrive validated by ``mixers.functional.gated_retention``. Computation runs in float32 (float64 for float64
inputs); ``o`` is cast back to the input dtype.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from mixers.backends import nonfinite
from mixers.backends.ragged import buckets
from mixers.catalogue import Backend, BackendRegistrar
from mixers.hookspecs import hookimpl
from mixers.ops.checks import state_dtype
from mixers.ops.gated_retention import later_sums

if TYPE_CHECKING:  # pragma: no cover
    from mixers.packing import Packing

GROUP = 8  # chunks computed at once: at most this many chunks' scores and decays are alive


class _Decays(NamedTuple):
    """The decays of chunks of c tokens, from their log decays ``g [B, H, n, c]``."""

    intra: Tensor  # [B, H, n, c, c]: exp(g_{j+1} + ... + g_i) for i >= j, else 0
    query: Tensor  # [B, H, n, c, 1]: exp(g_1 + ... + g_i), how much the incoming state reaches token i
    key: Tensor  # [B, H, n, c, 1]: exp(g_{j+1} + ... + g_c), how much token j reaches the outgoing state
    chunk: Tensor  # [B, H, n, 1, 1]: exp(g_1 + ... + g_c), the decay of the state across the chunk


def _decays(g: Tensor) -> _Decays:
    c = g.shape[-1]
    i = torch.arange(c, device=g.device)
    # grid[i, j] = sum over u of g_u for j < u <= i: g_u placed at rows u > j, summed down the rows.
    grid = torch.where(i[:, None] > i[None, :], g[..., :, None], g.new_zeros(()))
    intra = grid.cumsum_(-2).exp_().tril_()
    running = g.cumsum(-1)
    key = later_sums(g, -1).exp_()[..., None]
    return _Decays(intra, running.exp()[..., None], key, running[..., -1:, None].exp())


def _pieces(T: int, C: int, group: int | None = GROUP) -> list[tuple[int, int, int]]:
    """``(t0, t1, c)``: tokens ``t0..t1-1`` as chunks of c tokens, ``group`` full chunks at a time (``None``: all of
    them at once), then the rest."""
    full = T // C * C
    step = full if group is None else group * C
    pieces = [(t0, min(t0 + step, full), C) for t0 in range(0, full, max(step, 1))]
    return pieces + [(full, T, T - full)] if full < T else pieces


def _chunked(x: Tensor, t0: int, t1: int, c: int) -> Tensor:
    """Tokens ``t0..t1-1`` of ``x [B, T, H, D]`` (or ``[B, T, H]``) as chunks ``[B, H, n, c, D]`` (``[B, H, n, c]``)."""
    part = x[:, t0:t1].transpose(1, 2)
    return part.reshape(*part.shape[:2], (t1 - t0) // c, c, *part.shape[3:])


def _carry(kv: Tensor, state: Tensor, decay: Tensor, *, reverse: bool = False) -> tuple[Tensor, Tensor]:
    """``S <- decay[n] S + kv[n]`` over the chunks (dim 2), backwards if ``reverse``: the state before each step
    ``[B, H, n, Dk, Dv]`` and after the last."""
    before = torch.empty_like(kv)
    for n in range(kv.shape[2] - 1, -1, -1) if reverse else range(kv.shape[2]):
        before[:, :, n] = state
        state = torch.addcmul(kv[:, :, n], decay[:, :, n], state)
    return before, state


def _forward(q: Tensor, k: Tensor, v: Tensor, d: _Decays, state: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Chunks ``q, k [B, H, n, c, Dk]``, ``v [B, H, n, c, Dv]`` from ``state``: ``(o, the state entering each
    chunk, the state after the last)``."""
    kv = (k * d.key).transpose(-1, -2) @ v
    incoming, state = _carry(kv, state, d.chunk)
    scores = (q @ k.transpose(-1, -2)).mul_(d.intra)
    o = torch.baddbmm(
        ((q * d.query) @ incoming).flatten(0, 2), scores.flatten(0, 2), v.flatten(0, 2)
    )  # (one batched product into the other)
    return o.view(*q.shape[:-1], v.shape[-1]), incoming, state


def _backward(
    q: Tensor, k: Tensor, v: Tensor, do: Tensor, d: _Decays, incoming: Tensor, dstate: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients ``(dq, dk, dv, d incoming state)`` of ``_forward`` given ``do`` and the gradient of the state after
    the last chunk."""
    leaving, dstate = _carry(((q * d.query).transpose(-1, -2) @ do), dstate, d.chunk, reverse=True)
    dscores = (do @ v.transpose(-1, -2)).mul_(d.intra)
    dq = (do @ incoming.transpose(-1, -2)).mul_(d.query).add_(dscores @ k)
    dk = (v @ leaving.transpose(-1, -2)).mul_(d.key).add_(dscores.transpose(-1, -2) @ q)
    del dscores
    scores = (q @ k.transpose(-1, -2)).mul_(d.intra)
    dv = ((k * d.key) @ leaving).add_(scores.transpose(-1, -2) @ do)
    return dq, dk, dv, dstate


def _decay_grad(per_token: Tensor, final: Tensor, dfinal: Tensor) -> Tensor:
    """``dg [B, T, H]`` from ``per_token = q_i . dq_i - k_i . dk_i`` ``[B, T, H]`` and the final state and its
    gradient (module docstring): ``sum_{i>=t} per_token_i + <dS_T, S_T>``, summed in float64."""
    after = per_token.double().flip(1).cumsum(1).flip(1)
    return after + (dfinal.double() * final.double()).sum((-1, -2))[:, None]


def _streamed(q: Tensor, k: Tensor, v: Tensor, g: Tensor, state: Tensor, C: int) -> tuple[Tensor, Tensor]:
    """Chunkwise gated retention without gradients over ``q, k, v [B, T, H, D]``, ``g [B, T, H]`` from ``state``,
    ``GROUP`` chunks at a time (their operands copied into the chunk layout group by group): ``(o [B, T, H, Dv],
    final state)``."""
    B, T, H, _ = q.shape
    o = v.new_empty(B, H, T, v.shape[-1])
    for t0, t1, c in _pieces(T, C):
        part = (_chunked(x, t0, t1, c) for x in (q, k, v))
        o_part, _, state = _forward(*part, _decays(_chunked(g, t0, t1, c)), state)
        o[:, :, t0:t1] = o_part.flatten(2, 3)
    return o.transpose(1, 2), state


def _per_token(x: Tensor, dx: Tensor) -> Tensor:
    """``x_i . dx_i`` for chunks ``[B, H, n, c, D]``, as ``[B, H, n * c]``."""
    return (x * dx).sum(-1).flatten(2)


class _Chunkwise(torch.autograd.Function):
    """Chunkwise (or, with C = T, parallel) gated retention with the hand-written backward of the module
    docstring. The inputs are laid out in chunks once (the full chunks, then the rest), kept in that layout for
    the backward with the state entering each chunk and the final state; the backward recomputes the decays and
    scores."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, g: Tensor, state: Tensor, C: int) -> tuple[Tensor, Tensor]:
        parts, outs, kept = [], [], []
        for t0, t1, c in _pieces(q.shape[1], C, group=None):
            part = [_chunked(x, t0, t1, c).contiguous() for x in (q, k, v, g)]
            o, incoming, state = _forward(*part[:3], _decays(part[3]), state)
            parts += part
            outs.append(o.flatten(2, 3))
            kept.append(incoming)
        ctx.pieces = len(outs)
        ctx.save_for_backward(state, *parts, *kept)
        return torch.cat(outs, 2).transpose(1, 2), state

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do: Tensor, dfinal: Tensor) -> tuple[Tensor | None, ...]:
        final, *saved = ctx.saved_tensors
        parts, kept = saved[: 4 * ctx.pieces], saved[4 * ctx.pieces :]
        grads: list[list[Tensor]] = [[], [], []]
        per_token = []
        dstate, t1 = dfinal, do.shape[1]
        for i in range(ctx.pieces - 1, -1, -1):  # from the last piece
            q, k, v, g = parts[4 * i : 4 * i + 4]
            t0 = t1 - q.shape[2] * q.shape[3]
            dq, dk, dv, dstate = _backward(q, k, v, _chunked(do, t0, t1, q.shape[3]), _decays(g), kept[i], dstate)
            for found, grad in zip(grads, (dq, dk, dv), strict=True):
                found.insert(0, grad.flatten(2, 3))
            per_token.insert(0, _per_token(q, dq) - _per_token(k, dk))
            t1 = t0
        dq, dk, dv = (torch.cat(found, 2).transpose(1, 2) for found in grads)
        dg = _decay_grad(torch.cat(per_token, 2).transpose(1, 2), final, dfinal).to(parts[3].dtype)
        return dq, dk, dv, dg, dstate if ctx.needs_input_grad[4] else None, None


def _steps(q: Tensor, k: Tensor, v: Tensor, g: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    """Token by token, ``S_t = exp(g_t) S_{t-1} + k_t^T v_t`` and ``o_t = q_t S_t``, updating one state in place
    (``state`` is not written: a copy is)."""
    S = state.clone()
    decay = g.exp()[..., None, None]  # [B, T, H, 1, 1]
    o = v.new_empty(v.shape[1], *v.shape[:1], *v.shape[2:])  # [T, B, H, Dv]: each token's block contiguous
    for t in range(q.shape[1]):
        S.mul_(decay[:, t]).addcmul_(k[:, t, :, :, None], v[:, t, :, None, :])
        torch.matmul(q[:, t, :, None, :], S, out=o[t, :, :, None, :])
    return o.transpose(0, 1), S


class _Recurrent(torch.autograd.Function):
    """Recurrent gated retention whose backward keeps no state per token: with ``G_t`` the gradient of ``S_t``
    (``G_t = q_t^T do_t + exp(g_{t+1}) G_{t+1}``, from the final state's gradient), ``dq_t = do_t S_t^T`` (states
    recomputed in a forward sweep), ``dk_t = G_t v_t``, ``dv_t = k_t G_t``, the initial state's gradient
    ``exp(g_1) G_1``, and dg from dq and dk (module docstring). It saves the inputs and the final state."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, g: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        o, final = _steps(q, k, v, g, state)
        ctx.save_for_backward(q, k, v, g, state, final)
        return o, final

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do: Tensor, dfinal: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, g, state, final = ctx.saved_tensors
        T = q.shape[1]
        decay = g.exp()[..., None, None]
        dq, dk, dv = (torch.empty_like(x) for x in (q, k, v))
        S = state.clone()
        for t in range(T):
            S.mul_(decay[:, t]).addcmul_(k[:, t, :, :, None], v[:, t, :, None, :])
            torch.matmul(do[:, t, :, None, :], S.transpose(-1, -2), out=dq[:, t, :, None, :])
        G = dfinal.clone()
        for t in range(T - 1, -1, -1):
            G.addcmul_(q[:, t, :, :, None], do[:, t, :, None, :])  # G_t
            torch.matmul(G, v[:, t, :, :, None], out=dk[:, t, :, :, None])
            torch.matmul(k[:, t, :, None, :], G, out=dv[:, t, :, None, :])
            G.mul_(decay[:, t])
        dg = _decay_grad((q * dq).sum(-1) - (k * dk).sum(-1), final, dfinal).to(g.dtype)
        return dq, dk, dv, dg, G if ctx.needs_input_grad[4] else None


def _run(q: Tensor, k: Tensor, v: Tensor, g: Tensor, state: Tensor, mode: str, C: int | None) -> tuple[Tensor, Tensor]:
    """Gated retention of ``q, k, v [B, T, H, D]`` (T > 0), ``g [B, T, H]`` (all in the computing dtype, finite
    but for -inf in g) from ``state``, in ``mode``: ``(o, final state)``, ``o`` in the computing dtype."""
    tracked = nonfinite.recording(q, k, v, g, state)
    if mode == "recurrent":
        return _Recurrent.apply(q, k, v, g, state) if tracked else _steps(q, k, v, g, state)
    C = q.shape[1] if mode == "parallel" else min(C, q.shape[1])
    return _Chunkwise.apply(q, k, v, g, state, C) if tracked else _streamed(q, k, v, g, state, C)


def _packed(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, state: Tensor, packing: Packing, mode: str, C: int | None
) -> tuple[Tensor, Tensor]:
    """The packed sequences of ``q, k, v [1, T, H, D]``, ``g [1, T, H]`` from their state rows ``state [n, ...]``:
    each group of similar lengths as one padded batch (module docstring)."""
    groups = buckets(packing)
    outs, finals = [], []
    for layout in groups.layouts:
        N, L = layout.chunks, layout.C
        real = (torch.arange(L, device=q.device) < layout.lengths[:, None])[..., None]  # [N, L, 1]
        qs, ks, vs = (layout.gather(x).view(N, L, *x.shape[2:]) for x in (q, k, v))
        gs = layout.gather(g[..., None]).view(N, L, -1)
        ks, gs = ks * real[..., None], torch.where(real, gs, gs.new_zeros(()))
        o, final = _run(qs, ks, vs, gs, state.index_select(0, layout.order), mode, C)
        outs.append(layout.scatter(o.reshape(N * L, *o.shape[2:])))
        finals.append(final)
    rows = torch.cat([layout.order for layout in groups.layouts])
    return groups.join(outs)[None], state.index_copy(0, rows, torch.cat(finals))


class DecayMarks(NamedTuple):
    """NaN where a NaN or +inf log decay reaches, zero elsewhere (no gradient): its head's outputs from its position
    to its sequence's end, ``o [B, T, H, 1]``, and its head's state, ``state [rows, H, 1, 1]``."""

    o: Tensor
    state: Tensor

    def marked(self, o: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """``(o, state)`` computed from the finite decays, with the marks added (in their dtypes)."""
        return o + self.o.to(o.dtype), state + self.state.to(state.dtype)


def finite_decays(g: Tensor, packing: Packing | None = None) -> tuple[Tensor, DecayMarks | None]:
    """``g [B, T, H]`` with its NaN and +inf entries replaced by 0, and their ``DecayMarks``; or ``g`` as given and
    ``None`` when there is nothing to exclude (T < 2: nothing earlier to protect; no NaN or inf on the CPU). A -inf
    is a valid log decay (the state is forgotten) and stays. Public for other backends of the op (the fla plugin)."""
    if g.shape[1] < 2 or not nonfinite.may_be_nonfinite(g):  # (a -inf passes here, and is found harmless below)
        return g, None
    bad = torch.isnan(g) | (g == float("inf"))
    nan = torch.tensor(float("nan"), dtype=g.dtype, device=g.device)
    seen = bad.to(torch.int64).cumsum(1)
    if packing is None:
        rows = bad.any(1)
    else:  # counted from each sequence's first token; a state row per sequence
        before = torch.cat([torch.zeros_like(seen[:, :1]), seen], 1).index_select(1, packing.cu_seqlens[:-1].long())
        seen = seen - before[:, packing.seq_id]
        rows = seen.new_zeros(packing.n, g.shape[2]).index_add_(0, packing.seq_id, bad[0].to(torch.int64)) > 0
    marks = DecayMarks(torch.where(seen > 0, nan, 0.0)[..., None], torch.where(rows, nan, 0.0)[..., None, None])
    return torch.where(bad, 0.0, g), marks


def gated_retention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    *,
    mode: str,
    chunk_size: int | None,
    initial_state: Tensor | None,
    cu_seqlens: Packing | None = None,
) -> tuple[Tensor, Tensor]:
    """The torch backend of ``mixers.functional.gated_retention`` (inputs already validated; module docstring).

    ``cu_seqlens`` (``packs=True``): q, k, v ``[1, T, H, D]`` hold ``cu_seqlens.n`` sequences back to back and
    ``initial_state`` is None or ``[n, H, Dk, Dv]``; each sequence is computed from its own initial row alone."""
    B, T, H, Dk = q.shape
    Dv, out_dtype, acc = v.shape[-1], q.dtype, state_dtype(q.dtype)
    rows = B if cu_seqlens is None else cu_seqlens.n
    state = initial_state if initial_state is not None else q.new_zeros(rows, H, Dk, Dv, dtype=acc)
    if T == 0:
        return v.new_empty(B, 0, H, Dv), state
    (q, k, v), found = nonfinite.finite_parts(q, k, v, cu_seqlens)
    g, decay_marks = finite_decays(g, cu_seqlens)
    q, k, v, g = (x.to(acc) for x in (q, k, v, g))
    if cu_seqlens is None:
        o, state = _run(q, k, v, g, state, mode, chunk_size)
    else:
        o, state = _packed(q, k, v, g, state, cu_seqlens, mode, chunk_size)
    o, state = nonfinite.marked(found, o, state)
    if decay_marks is not None:
        o, state = decay_marks.marked(o, state)
    return o.to(out_dtype), state


@hookimpl
def register_backends(register: BackendRegistrar) -> None:
    register(
        Backend(
            op="gated_retention",
            name="torch",
            fn=gated_retention,
            priority=0,
            packs=True,
            description="pure torch; any device and dtype; gradients for q, k, v, g and the state",
        )
    )
