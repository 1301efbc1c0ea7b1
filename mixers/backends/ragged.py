"""Packed sequences laid out as a batch for the torch backends: ``Ragged`` and ``buckets``.

A packed row ``[1, T, ...]`` holds ``n`` sequences back to back (``mixers.packing.Packing``). To compute them
together, without a loop over sequences and without anything crossing a boundary, the torch backends give each
sequence rows of its own: ``ragged`` cuts every sequence into chunks of ``C`` tokens from its own first token and
lays the chunks out step-major (step j holds the j-th chunk of every sequence that has one), so a recurrence over
chunks (or tokens, ``C = 1``) takes as many batched steps as the longest sequence has chunks. With ``C`` at least
the longest length, each sequence is one padded row: ``buckets`` groups the sequences of similar lengths, so that
padding each group to its longest wastes little.

Layouts are built on the host from the boundaries (no device sync), once per packing and shape: every layer of a
model shares its packing.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from mixers.packing import Packing

SLACK = 64 * 64  # padding a sequence into a bucket may waste this much attention area...
RATIO = 0.9  # ... or, in a bucket of long sequences, pad those down to this share of its longest


@dataclass(frozen=True, eq=False)
class Ragged:
    """Chunks of ``C`` tokens of some sequences of a packed row (every non-empty one, or a bucket of them), each
    sequence's from its own first token, laid out step-major: row r is sequence ``order[r]`` (by decreasing number
    of chunks), and step ``(a, m)`` holds the next chunk of rows ``0..m-1`` as chunks ``a..a+m-1``.

    A sequence's last chunk may hold fewer than C tokens (``lengths``): its empty slots repeat its last token, so
    gathering takes one pass over the inputs and never reads another sequence. A consumer keeps those slots
    harmless by causality (no real token of the chunk sees them) and drops their outputs. A layout of one
    sequence in one chunk (``span``) gathers by slicing."""

    C: int
    steps: tuple[tuple[int, int], ...]  # (first chunk, rows) of each step
    order: Tensor  # int64 [rows]: the sequence in each row
    index: Tensor  # int64 [N * C]: the token in each slot (its chunk's last token in an empty slot)
    tokens: Tensor  # int64 [T']: the layout's tokens, ascending (all T when it holds every sequence)
    slot: Tensor  # int64 [T']: the slot of each of those tokens
    dest: Tensor  # int64 [N * C]: the token of each slot (T in an empty slot: a row to drop)
    lengths: Tensor  # int64 [N]: the tokens each chunk holds
    whole: bool  # whether it holds every token of the row (``tokens`` is ``0..T-1``)
    in_order: bool  # whether row r is sequence r, for every sequence of the row
    span: tuple[int, int] | None  # the tokens of its one sequence when that is its one full chunk

    @property
    def chunks(self) -> int:
        return self.lengths.shape[0]

    def gather(self, x: Tensor, a: int = 0, b: int | None = None, dtype: torch.dtype | None = None) -> Tensor:
        """Slots of chunks ``a..b-1`` of the packed row ``x [1, T, h, D]``, token-major: ``[(b - a) * C, h, D]``."""
        b = self.chunks if b is None else b
        if self.span is not None:
            return x[0, self.span[0] : self.span[1]].to(dtype)
        return x[0].index_select(0, self.index[a * self.C : b * self.C]).to(dtype)

    def gather_heads(self, x: Tensor, a: int = 0, b: int | None = None, dtype: torch.dtype | None = None) -> Tensor:
        """Chunks ``a..b-1`` of the packed row ``x [1, T, H, D]`` (contiguous, else it is copied whole),
        head-major: ``[1, H, b - a, C, D]`` (contiguous, in one pass over the rows it reads)."""
        b = self.chunks if b is None else b
        if self.span is not None:
            return (
                x[0, self.span[0] : self.span[1]]
                .transpose(0, 1)
                .to(dtype, memory_format=torch.contiguous_format)[None, :, None]
            )
        H, D = x.shape[2:]
        heads = torch.arange(H, device=x.device)[:, None]
        rows = (self.index[a * self.C : b * self.C] * H + heads).flatten()  # the (token, head) rows, head-major
        return x[0].reshape(-1, D).index_select(0, rows).to(dtype).view(1, H, b - a, self.C, D)

    def put_heads(self, o: Tensor, out: Tensor, a: int = 0) -> None:
        """Write chunks ``a..`` of ``o [1, H, b - a, C, D]`` (head-major) at their tokens' rows of ``out [T + 1, H,
        D]`` (token-major; row T takes the empty slots)."""
        slots = o[0].flatten(1, 2).transpose(0, 1)  # [(b - a) * C, H, D]
        out.index_copy_(0, self.dest[a * self.C : a * self.C + slots.shape[0]], slots)

    def scatter(self, o: Tensor) -> Tensor:
        """Every slot's result ``o [N * C, h, D]`` (token-major) back to the layout's tokens: ``[T', h, D]``."""
        o = o.reshape(-1, *o.shape[-2:])
        return o if self.span is not None else o.index_select(0, self.slot)


_LAYOUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Packing -> {key: layout(s)}


def ragged(packing: Packing, C: int, sequences: tuple[int, ...] | None = None) -> Ragged:
    """The ``Ragged`` layout of the non-empty ``sequences`` (default: every non-empty one) of ``packing`` in
    chunks of ``C`` tokens."""
    layouts = _LAYOUTS.setdefault(packing, {})
    key = ("ragged", C, sequences)
    if key not in layouts:
        layouts[key] = _build(packing, C, sequences)
    return layouts[key]


@dataclass(frozen=True, eq=False)
class Buckets:
    """Layouts that hold every token of a packed row once between them, and how to join their results."""

    layouts: tuple[Ragged, ...]
    position: Tensor | None  # int64 [T]: each token's place in the layouts' results joined (None: one whole layout)
    _rows: dict[int, _HeadRows] = field(default_factory=dict, repr=False)  # per number of heads

    def join(self, parts: list[Tensor]) -> Tensor:
        """The layouts' results for their tokens (``parts[i] [T_i, ...]``) as one ``[T, ...]``, in token order."""
        return parts[0] if self.position is None else torch.cat(parts).index_select(0, self.position)

    def gather_heads(self, x: Tensor, dtype: torch.dtype | None = None) -> tuple[Tensor, ...]:
        """Every layout's chunks of the packed row ``x [1, T, H, D]``, head-major: ``[1, H, N_i, C_i, D]`` each
        (contiguous), in one pass over x. Differentiable, its backward one pass too (``_Gather``)."""
        H, D = x.shape[2:]
        parts = _Gather.apply(x, self._heads(H), dtype)
        return tuple(p.view(1, H, layout.chunks, layout.C, D) for p, layout in zip(parts, self.layouts, strict=True))

    def scatter_heads(self, parts: tuple[Tensor, ...]) -> Tensor:
        """Every layout's results ``parts[i] [1, H, N_i, C_i, D]`` (head-major) at their tokens: ``[T, H, D]``.
        Differentiable (``_Scatter``)."""
        return _Scatter.apply(self._heads(parts[0].shape[1]), *parts)

    def _heads(self, H: int) -> _HeadRows:
        if H not in self._rows:
            self._rows[H] = _HeadRows.of(self.layouts, H)
        return self._rows[H]


@dataclass(frozen=True, eq=False)
class _HeadRows:
    """The slots of layouts that hold every token of a packed row ``[T, H, D]`` once, for its H heads, as rows of
    the row viewed as ``[T * H, D]``; each layout's slots head-major (``[H, N_i * C_i]``). Each (token, head) row is
    one slot's own; an empty slot reads its chunk's last token and writes a row past T * H (one to drop)."""

    take: Tensor  # int64 [S]: the row each slot reads, the layouts' slots one after the other
    put: tuple[Tensor, ...]  # int64 [S_i] per layout: the row each slot writes
    empty: tuple[Tensor, ...]  # int64 [E_i] per layout: its empty slots
    reread: tuple[Tensor, ...]  # int64 [E_i] per layout: the row each of its empty slots reads
    sizes: tuple[int, ...]  # S_i: the slots of each layout
    rows: int  # T * H
    heads: int

    @classmethod
    def of(cls, layouts: tuple[Ragged, ...], H: int) -> _HeadRows:
        heads = torch.arange(H, device=layouts[0].index.device)[:, None]
        T = sum(layout.tokens.shape[0] for layout in layouts)
        take = [(layout.index * H + heads).flatten() for layout in layouts]
        put = tuple((layout.dest * H + heads).flatten() for layout in layouts)
        empty = tuple((p >= T * H).nonzero().flatten() for p in put)
        reread = tuple(t[e] for t, e in zip(take, empty, strict=True))
        return cls(torch.cat(take), put, empty, reread, tuple(p.shape[0] for p in put), T * H, H)

    def write(self, slots: list[Tensor], dtype: torch.dtype) -> Tensor:
        """Each slot of ``slots`` (each layout's, ``[S_i, D]``) at its row: ``[T * H, D]``."""
        out = slots[0].new_empty(self.rows + self.heads, slots[0].shape[-1], dtype=dtype)
        for part, put in zip(slots, self.put, strict=True):
            out.index_copy_(0, put, part.to(dtype))
        return out[: self.rows]


class _Gather(torch.autograd.Function):
    """``Buckets.gather_heads``: the slots ``x.view(T * H, D)[take]``, by layout. Its backward writes each slot's
    gradient at its own row and adds the empty slots' on top (they reread a row): one pass, where autograd's would
    zero-fill and scatter-add a whole ``[T * H, D]`` per gather."""

    @staticmethod
    def forward(ctx, x: Tensor, rows: _HeadRows, dtype: torch.dtype | None) -> tuple[Tensor, ...]:
        ctx.rows, ctx.shape, ctx.dtype = rows, x.shape, x.dtype
        T, H, D = x.shape[1:]
        stride = x.stride(1) // D  # rows from one token to the next
        if x.stride(3) != 1 or x.stride(2) != D or x.stride(1) % D:  # (its (token, head) rows are not rows of D)
            x, stride = x.contiguous(), H
        take = rows.take if stride == H else rows.take // H * stride + rows.take % H
        flat = x.as_strided(((T - 1) * stride + H, D), (D, 1))  # every row of D from x's first: no copy of x
        return flat.index_select(0, take).to(dtype).split(rows.sizes)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads: Tensor) -> tuple[Tensor | None, ...]:
        rows = ctx.rows
        slots = [g.reshape(-1, ctx.shape[-1]) for g in grads]
        dx = rows.write(slots, ctx.dtype)
        for part, empty, reread in zip(slots, rows.empty, rows.reread, strict=True):
            dx.index_add_(0, reread, part.index_select(0, empty).to(ctx.dtype))
        return dx.view(ctx.shape), None, None


class _Scatter(torch.autograd.Function):
    """``Buckets.scatter_heads``: each slot's result at its own row, the empty slots' dropped. Its backward reads
    each slot's gradient from its row, zero in the empty slots."""

    @staticmethod
    def forward(ctx, rows: _HeadRows, *parts: Tensor) -> Tensor:
        ctx.rows, ctx.shapes = rows, [p.shape for p in parts]
        H, D = parts[0].shape[1], parts[0].shape[-1]
        return rows.write([p.reshape(-1, D) for p in parts], parts[0].dtype).view(-1, H, D)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do: Tensor) -> tuple[Tensor | None, ...]:
        rows = ctx.rows
        slots = do.reshape(-1, do.shape[-1]).index_select(0, rows.take).split(rows.sizes)
        grads = (
            g.index_fill_(0, empty, 0).view(shape)
            for g, empty, shape in zip(slots, rows.empty, ctx.shapes, strict=True)
        )
        return None, *grads


def buckets(packing: Packing, chunk: int | None = None) -> Buckets:
    """The non-empty sequences of ``packing`` in groups of similar lengths (longest first), each a ``Ragged`` of
    one chunk per sequence, as long as its longest: a padded batch per group. A group takes the next sequence while
    padding it costs less attention area than ``SLACK`` (about what a call of its own costs) or than a share
    ``1 - RATIO^2`` of the group's longest (so that the waste of groups of long sequences stays bounded). With
    ``chunk``, only the sequences of at most ``chunk`` tokens are grouped so (each is one chunk anyway); the
    longer ones make one ``Ragged`` of chunks of ``chunk`` tokens."""
    layouts = _LAYOUTS.setdefault(packing, {})
    key = ("buckets", chunk)
    if key not in layouts:
        lengths = packing.sizes
        longer = tuple(s for s, L in enumerate(lengths) if chunk is not None and L > chunk)
        grouped = [s for s, L in enumerate(lengths) if L and s not in longer]
        groups: list[list[int]] = []
        for s in sorted(grouped, key=lambda s: -lengths[s]):
            top = lengths[groups[-1][0]] if groups else 0
            if not groups or top * top - lengths[s] ** 2 > max(SLACK, (1 - RATIO**2) * top * top):
                groups.append([])
            groups[-1].append(s)
        parts = tuple(ragged(packing, lengths[g[0]], tuple(g)) for g in groups)
        if longer:
            parts = (ragged(packing, chunk, longer), *parts)
        if len(parts) == 1 and parts[0].whole:
            layouts[key] = Buckets(parts, None)
        else:
            tokens = torch.cat([layout.tokens for layout in parts])
            position = torch.empty_like(tokens).index_copy_(
                0, tokens, torch.arange(tokens.shape[0], device=tokens.device)
            )
            layouts[key] = Buckets(parts, position)
    return layouts[key]


def _build(packing: Packing, C: int, sequences: tuple[int, ...] | None) -> Ragged:
    cu = torch.tensor(packing.bounds)
    lengths = cu[1:] - cu[:-1]
    chosen = (lengths > 0).nonzero().flatten() if sequences is None else torch.tensor(sequences, dtype=torch.int64)
    counts = (lengths[chosen] + C - 1) // C  # chunks per sequence
    order = chosen[torch.argsort(counts, descending=True, stable=True)]
    counts = (lengths[order] + C - 1) // C
    rows = (counts > torch.arange(int(counts.max()))[:, None]).sum(1)  # rows advanced by each step
    first = rows.cumsum(0) - rows
    step = torch.repeat_interleave(torch.arange(rows.shape[0]), rows)  # the step of each chunk
    seq = order[torch.arange(step.shape[0]) - first[step]]
    size = (lengths[seq] - step * C).clamp(max=C)
    i = torch.arange(C)
    index = (cu[seq, None] + step[:, None] * C + torch.minimum(i, size[:, None] - 1)).flatten()
    full = (i < size[:, None]).flatten()
    slot = torch.empty(packing.total, dtype=torch.int64)
    slot[index[full]] = torch.arange(index.shape[0])[full]
    dest = index.masked_fill(~full, packing.total)
    whole = bool(full.sum() == packing.total)
    tokens = torch.arange(packing.total) if whole else index[full].sort().values
    slot = slot[tokens]
    in_order = order.shape[0] == packing.n and bool((order == torch.arange(packing.n)).all())
    start = int(cu[order[0]])
    span = (start, start + C) if order.shape[0] == 1 and int(size[0]) == C and size.shape[0] == 1 else None
    device = packing.cu_seqlens.device
    return Ragged(
        C,
        tuple(zip(first.tolist(), rows.tolist(), strict=True)),
        *(t.to(device) for t in (order, index, tokens, slot, dest, size)),
        whole=whole,
        in_order=in_order,
        span=span,
    )
