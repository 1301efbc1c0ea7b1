"""Packed variable-length sequences for any op: ``cu_seqlens``, as fla takes it.

Sequence ``n`` of a packed input ``[1, T, ...]`` is tokens ``cu_seqlens[n] .. cu_seqlens[n+1] - 1``; every
sequence starts from its own state (``initial_state[n]``, or zeros) and nothing crosses a boundary. The states
come back one per sequence, ``[N, ...]``.

This is the generic path: it runs the op once per sequence, through the op's own validation, backend choice and
output checks, so it holds for every op and every backend, a plugin's included, in every mode. Its cost is one
backend call per sequence; a backend that resets its state at the boundaries inside one kernel is the fast path
a later change can add behind the same argument.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mixers.interface import map_structure, tensors_in

if TYPE_CHECKING:  # pragma: no cover
    from mixers.ops.base import Op


def check_cu_seqlens(cu_seqlens: object, T: int) -> list[int]:
    """``cu_seqlens`` as a list of boundaries: an int32/int64 tensor ``[N+1]`` starting at 0, ending at ``T``,
    never decreasing (a repeat is an empty sequence). Reading the values costs one device sync."""
    if not isinstance(cu_seqlens, Tensor):
        raise TypeError(f"cu_seqlens must be an int32 or int64 tensor [N+1], got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must have dtype torch.int32 or torch.int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"cu_seqlens must be a 1-D tensor [N+1] with N >= 1 sequences, got shape {list(cu_seqlens.shape)}"
        )
    bounds = [int(b) for b in cu_seqlens.tolist()]
    if bounds[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {bounds[0]} (cu_seqlens = {_short(bounds)})")
    if bounds[-1] != T:
        raise ValueError(
            f"cu_seqlens must end at the packed length T = {T}, got {bounds[-1]} (cu_seqlens = {_short(bounds)})"
        )
    for i, (a, b) in enumerate(zip(bounds, bounds[1:], strict=False)):
        if b < a:
            raise ValueError(
                f"cu_seqlens must not decrease, got {a} then {b} at positions {i} and {i + 1} "
                f"(cu_seqlens = {_short(bounds)})"
            )
    return bounds


@dataclass(frozen=True, eq=False)
class Packing:
    """Checked ``cu_seqlens`` with what every layer of a model needs from it, computed once per forward pass
    (one device sync) instead of in every layer: the boundaries as ints, and per token its sequence and its
    position inside it. Ops and mixers take one wherever they take ``cu_seqlens``."""

    cu_seqlens: Tensor  # int64 [N+1] on the inputs' device
    bounds: tuple[int, ...]  # the same, as Python ints
    seq_id: Tensor  # int64 [T]: the sequence of each token
    offsets: Tensor  # int64 [T]: each token's position in its sequence (0 at its first token)

    @classmethod
    def of(cls, cu_seqlens: object, T: int, device: torch.device) -> Packing:
        """``cu_seqlens`` (a tensor, checked against the packed length ``T``, or a ``Packing``) as a ``Packing``."""
        if isinstance(cu_seqlens, Packing):
            if cu_seqlens.total != T:
                raise ValueError(f"cu_seqlens must end at the packed length T = {T}, got {cu_seqlens.total}")
            return cu_seqlens
        if isinstance(cu_seqlens, Tensor) and cu_seqlens.device != device:
            raise ValueError(f"cu_seqlens must be on the inputs' device {device}, got {cu_seqlens.device}")
        bounds = check_cu_seqlens(cu_seqlens, T)
        cu = cu_seqlens.to(torch.int64)
        lengths = cu[1:] - cu[:-1]
        seq_id = torch.repeat_interleave(torch.arange(len(bounds) - 1, device=device), lengths, output_size=T)
        offsets = torch.arange(T, device=device) - cu[seq_id]
        return cls(cu, tuple(bounds), seq_id, offsets)

    @property
    def n(self) -> int:
        """The number of sequences (empty ones included)."""
        return len(self.bounds) - 1

    @property
    def total(self) -> int:
        return self.bounds[-1]

    @property
    def lengths(self) -> Tensor:
        """int64 ``[N]``."""
        return self.cu_seqlens[1:] - self.cu_seqlens[:-1]

    @property
    def last(self) -> Tensor:
        """int64 ``[N]``: the index of each sequence's last token (of the token before it, for an empty one)."""
        return (self.cu_seqlens[1:] - 1).clamp(min=0)


def unpad(attention_mask: object, B: int, T: int, device: torch.device) -> tuple[Tensor, Packing]:
    """A padded batch as packed sequences: ``(mask, packing)``, with ``x[mask][None]`` the packed input (row by
    row, in order) and ``out[mask] = y[0]`` putting a packed output back."""
    mask = check_attention_mask(attention_mask, B, T, device)
    counts = mask.sum(dim=1)
    return mask, Packing.of(torch.cat([counts.new_zeros(1), counts.cumsum(0)]), int(counts.sum()), device)


def _short(values: list[int]) -> str:
    text = str(values)
    return text if len(text) <= 80 else text[:77] + "..."


def _rows(state: Any, n: int) -> Any:
    """Row ``n`` of every tensor of ``state`` (kept as a batch of one)."""
    return map_structure(state, lambda t: t[n : n + 1])


def join_rows(states: list[Any]) -> Any:
    """One state whose rows are ``states`` (each a batch of one): a state type's own ``cat`` where it has one
    (a KV cache pads capacities to the longest), else each tensor concatenated along the batch."""
    first = states[0]
    join = getattr(type(first), "cat", None)
    if callable(join):
        return join(states)
    columns = [tensors_in(s) for s in states]
    joined = iter([torch.cat(group) for group in zip(*columns, strict=True)])
    return map_structure(first, lambda _t: next(joined))


def _state_rows(state: Any) -> int | None:
    tensors = tensors_in(state)
    return None if not tensors else tensors[0].shape[0]


def _bind(op: Op, args: tuple[Any, ...], kwargs: dict[str, Any], sequences: tuple[str, ...]) -> dict | None:
    """The call's arguments by name (as the op's ``prepare`` takes them), or ``None`` if its first sequence
    argument is not a tensor with a time dimension (then the op's own validation says what is wrong)."""
    arguments = dict(inspect.signature(op.prepare).bind(*args, **kwargs).arguments)
    first = arguments.get(sequences[0])
    return arguments if isinstance(first, Tensor) and first.dim() >= 2 else None


def packed_call(
    op: Op,
    call: Callable[..., tuple[Tensor, Any]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    cu_seqlens: object,
    sequences: tuple[str, ...],
    state_name: str,
) -> tuple[Tensor, Any]:
    """``op`` over the packed sequences of ``cu_seqlens``: ``call(*args, **kwargs)`` once per sequence, with the
    ``sequences`` arguments sliced along time and ``state_name`` taking that sequence's state."""
    arguments = _bind(op, args, kwargs, sequences)
    if arguments is None:
        return call(*args, **kwargs)  # the op's validation names the problem
    first = arguments[sequences[0]]
    for name in sequences:
        t = arguments.get(name)
        if isinstance(t, Tensor) and t.shape[0] != 1:
            raise ValueError(
                f"with cu_seqlens, {name} must hold the packed sequences in one row (batch size 1, "
                f"[1, T, ...]), got batch size {t.shape[0]} (shape {list(t.shape)})"
            )
    bounds = Packing.of(cu_seqlens, first.shape[1], first.device).bounds
    N = len(bounds) - 1
    state = arguments.get(state_name)
    rows = _state_rows(state) if state is not None else None
    if state is not None and rows != N:
        raise ValueError(
            f"with cu_seqlens, {state_name} must hold one state per sequence: cu_seqlens describes {N} "
            f"sequences, {state_name} holds {rows}"
        )
    outs, finals = [], []
    for n, (start, stop) in enumerate(zip(bounds, bounds[1:], strict=False)):
        piece = dict(arguments)  # a copy per sequence
        for name in sequences:
            if isinstance(piece.get(name), Tensor):
                piece[name] = piece[name][:, start:stop]
        if state is not None:
            piece[state_name] = _rows(state, n)
        o, final = call(**piece)
        outs.append(o)
        finals.append(final)
    return torch.cat(outs, dim=1), join_rows(finals)


def check_attention_mask(mask: object, B: int, T: int, device: torch.device) -> Tensor:
    """``mask`` as a bool ``[B, T]``: 0/1 (or bool) per token, each row's ones one contiguous run (left or right
    padding, or none), on ``device``."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"attention_mask must be a 0/1 tensor [B, T], got {type(mask).__name__}")
    if tuple(mask.shape) != (B, T):
        raise ValueError(f"attention_mask must have shape [B, T] = [{B}, {T}] as the inputs, got {list(mask.shape)}")
    if mask.is_floating_point() or mask.is_complex():
        raise TypeError(f"attention_mask must be a bool or integer tensor of 0 and 1, got dtype {mask.dtype}")
    if mask.device != device:
        raise ValueError(f"attention_mask must be on the inputs' device {device}, got {mask.device}")
    if mask.dtype != torch.bool:
        if bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError("attention_mask must hold only 0 and 1")
        mask = mask != 0
    # Contiguous ones: at most one 0->1 and one 1->0 step along each row.
    steps = (mask[:, 1:] != mask[:, :-1]).sum(dim=1) if T > 1 else torch.zeros(B, dtype=torch.long)
    ends = mask[:, 0].long() + mask[:, -1].long() if T > 0 else torch.zeros(B, dtype=torch.long)
    holes = (steps > 2) | ((steps == 2) & (ends > 0))  # 1..0..1 (a hole) or 0..1..0 with a 1 at an end
    if bool(holes.any()):
        rows = holes.nonzero().flatten().tolist()
        raise ValueError(
            f"attention_mask rows must be one run of ones (left or right padding), but rows {_short(rows)} have "
            f"a hole in the middle"
        )
    return mask


def repad(y: Tensor, mask: Tensor) -> Tensor:
    """Packed outputs ``y [1, N, ...]`` (of the real tokens, row by row) put back in the padded batch of ``mask``
    ``[B, T]``: ``[B, T, ...]``, zeros at the padding (the inverse of ``x[mask][None]``)."""
    out = y.new_zeros(*mask.shape, *y.shape[2:])
    out[mask] = y[0]
    return out


def padded_call(
    op: Op,
    call: Callable[..., tuple[Tensor, Any]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    attention_mask: object,
    sequences: tuple[str, ...],
    state_name: str,
) -> tuple[Tensor, Any]:
    """``op`` over a padded batch: row b's real tokens are where ``attention_mask[b]`` is 1 (left or right
    padding). They are packed (the padding dropped, whatever it holds), run as sequences, and the outputs put
    back in place, zeros at the padding; the state of row b is that of its real tokens."""
    arguments = _bind(op, args, kwargs, sequences)
    if arguments is None:
        return call(*args, **kwargs)  # the op's validation names the problem
    first = arguments[sequences[0]]
    B, T = first.shape[:2]
    mask, cu = unpad(attention_mask, B, T, first.device)
    for name in sequences:
        t = arguments.get(name)
        if isinstance(t, Tensor):
            arguments[name] = t[mask][None]  # (1, sum of lengths, ...): row by row, in order
    o, state = packed_call(op, call, (), arguments, cu, sequences, state_name)
    return repad(o, mask), state
