"""Causality with non-finite inputs, forward and backward, for any backend of the built-in ops.

A NaN or inf at position t must reach neither an output before t nor, through the backward, a gradient of the
inputs before t. Masking by multiplication cannot give that: ``0 * NaN`` is NaN, in the forward product that
weighs a later value by zero and in the backward product that meets a later NaN with a zero upstream gradient
(``o[:, :t].sum().backward()``). So a backend computes on the finite parts of q, k and v (``finite_parts``:
non-finite entries replaced by zeros with ``torch.where``, whose backward gives them no gradient) and adds,
without gradient, NaN where the non-finite entries reach (``Marks``): a query its own output; a key every output
of its head from its position on and its state rows; a value its channel of those outputs and its state
columns. Nothing non-finite then enters the differentiated computation, so the gradients of the inputs before t
are exactly those of the clean inputs, and the outputs from t on are NaN. The gradient of a non-finite entry is
zero (the loss is NaN wherever it reached).

This costs a few elementwise passes, only when some input may be non-finite (``may_be_nonfinite``) and T > 1
(a single token is seen by nothing earlier: the decode step is unchanged).

Packed sequences (a ``mixers.packing.Packing``): a non-finite entry reaches the outputs of its own sequence only,
from its position to the sequence's end, and the state row of its sequence.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from mixers.packing import Packing


def recording(*tensors: Tensor | None) -> bool:
    """Whether autograd records a call on these tensors (only then must the backward meet no NaN)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def may_be_nonfinite(*tensors: Tensor) -> bool:
    """Whether the tensors may hold a NaN or inf: always on a GPU, where asking would make the host wait for
    the device, and while compiling, where asking would break the graph; on the CPU, whether their sum is not
    finite (it is not whenever an entry is not)."""
    if torch.compiler.is_compiling() or any(t.device.type != "cpu" for t in tensors):
        return True
    return not all(bool(torch.isfinite(t.sum())) for t in tensors)


class Marks(NamedTuple):
    """NaN where non-finite inputs reach, zero elsewhere (no gradient), for ``q [B, T, H, Dk]`` and ``k, v``
    with ``Hkv`` heads (query head h reads key head ``h // (H / Hkv)``)."""

    o: Tensor  # [B, T, H, Dv]: the outputs at a non-finite query, and from a non-finite key or value on
    keys: Tensor  # [B, Hkv, Dk]: the state rows of a non-finite key entry
    values: Tensor  # [B, Hkv, Dv]: the state columns of a non-finite value entry

    def state(self) -> Tensor:
        """``[B, Hkv, Dk, Dv]``: the entries of a ``k^T v`` state a non-finite key or value reaches."""
        return self.keys[..., :, None] + self.values[..., None, :]


def _nan_at_nonfinite(x: Tensor) -> Tensor:
    return torch.where(torch.isfinite(x), 0.0, torch.nan).to(x.dtype)


@torch.no_grad()
def marks(q: Tensor, k: Tensor, v: Tensor, packing: Packing | None = None) -> Marks:
    """Where the non-finite entries of ``q, k, v [B, T, heads, D]`` reach (see ``Marks``); with ``packing``
    (``B = 1``), within their sequence, and the state marks have a row per sequence."""
    mq, mk, mv = _nan_at_nonfinite(q), _nan_at_nonfinite(k), _nan_at_nonfinite(v)
    step = mk.sum(-1, keepdim=True) + mv  # [B, T, Hkv, Dv]: NaN where a key or value entry is not finite
    if packing is None:
        reach, keys, values = step.cumsum(1), mk.sum(1), mv.sum(1)
    else:  # counted, not summed: a NaN minus the NaN before a boundary would be NaN, not 0
        seen = torch.cat([torch.zeros_like(step[:, :1], dtype=torch.int64), step.isnan().cumsum(1)], dim=1)
        starts = packing.cu_seqlens[packing.seq_id]  # each token's sequence's first token
        within = seen[:, 1:] - seen.index_select(1, starts)
        reach = torch.where(within > 0, torch.nan, 0.0).to(step.dtype)
        keys, values = (m.new_zeros(packing.n, *m.shape[2:]).index_add_(0, packing.seq_id, m[0]) for m in (mk, mv))
    reach = reach.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
    return Marks(reach + mq.sum(-1, keepdim=True), keys, values)


def finite_parts(
    q: Tensor, k: Tensor, v: Tensor, packing: Packing | None = None
) -> tuple[tuple[Tensor, Tensor, Tensor], Marks | None]:
    """``(q, k, v)`` with non-finite entries zeroed, and their ``Marks``; or the inputs as given and ``None``
    when there is nothing to exclude (T < 2, or all finite on the CPU). Add ``marks.o`` to the output (and
    ``marks.state()`` to a ``k^T v`` state) computed from the finite parts. With ``packing`` (packed sequences,
    ``B = 1``), the marks stay within each sequence and the state marks have a row per sequence."""
    if q.shape[1] < 2 or not may_be_nonfinite(q, k, v):
        return (q, k, v), None
    found = marks(q, k, v, packing)
    return tuple(torch.where(torch.isfinite(x), x, 0.0) for x in (q, k, v)), found  # type: ignore[return-value]


def marked(found: Marks | None, o: Tensor, kv: Tensor, z: Tensor | None = None) -> tuple[Tensor, ...]:
    """``(o, kv)``, or ``(o, kv, z)`` for linear attention's normaliser state, computed from the finite parts,
    with ``found``'s NaN added where the non-finite inputs reach; as given when ``found`` is None."""
    if found is not None:
        o, kv, z = o + found.o, kv + found.state(), None if z is None else z + found.keys
    return (o, kv) if z is None else (o, kv, z)
