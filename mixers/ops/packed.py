"""Packed variable-length sequences for any op: ``cu_seqlens``, as fla takes it.

Sequence ``n`` of a packed input ``[1, T, ...]`` is tokens ``cu_seqlens[n] .. cu_seqlens[n+1] - 1``; every
sequence starts from its own state (``initial_state[n]``, or zeros) and nothing crosses a boundary. The states
come back one per sequence, ``[N, ...]``.

Two paths. An op whose validation takes ``cu_seqlens`` (its ``prepare`` does) and a backend that declares
``packs=True`` compute the whole packed row in one call: the backend resets its state at the boundaries itself.
Any other op or backend runs once per sequence, through the op's own validation, backend choice and output
checks, which holds for every op and every backend, a plugin's included, in every mode, at one backend call per
sequence.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mixers.packing import Packing, join_rows, repad, unpad
from mixers.structure import map_structure, tensors_in

if TYPE_CHECKING:  # pragma: no cover
    from mixers.ops.base import Op


def _rows(state: Any, n: int) -> Any:
    """Row ``n`` of every tensor of ``state`` (kept as a batch of one)."""
    return map_structure(state, lambda t: t[n : n + 1])


def _state_rows(state: Any) -> int | None:
    tensors = tensors_in(state)
    return None if not tensors else tensors[0].shape[0]


def _bind(op: Op, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict | None:
    """The call's arguments by name (as the op's ``prepare`` takes them), or ``None`` if its first sequence
    argument is not a tensor with a time dimension (then the op's own validation says what is wrong)."""
    arguments = op.arguments(*args, **kwargs)
    first = arguments.get(op.sequences[0])
    return arguments if isinstance(first, Tensor) and first.dim() >= 2 else None


def packed_call(op: Op, backend: str, args: tuple[Any, ...], kwargs: dict[str, Any], cu_seqlens: object) -> Any:
    """``op`` over the packed sequences of ``cu_seqlens`` (a tensor ``[N+1]`` or a ``Packing``): in one backend
    call where the op and the backend pack, else once per sequence (the op's ``sequences`` arguments sliced along
    time, its ``state_arg`` taking that sequence's state)."""
    arguments = _bind(op, args, kwargs)
    if arguments is None:
        return op.run(backend, op.prepare(*args, **kwargs))  # the op's validation names the problem
    first = arguments[op.sequences[0]]
    for name in op.sequences:
        t = arguments.get(name)
        if isinstance(t, Tensor) and t.shape[0] != 1:
            raise ValueError(
                f"with cu_seqlens, {name} must hold the packed sequences in one row (batch size 1, "
                f"[1, T, ...]), got batch size {t.shape[0]} (shape {list(t.shape)})"
            )
    packing = Packing.of(cu_seqlens, first.shape[1], first.device)
    state = arguments.get(op.state_arg)
    rows = _state_rows(state) if state is not None else None
    if state is not None and rows != packing.n:
        raise ValueError(
            f"with cu_seqlens, {op.state_arg} must hold one state per sequence: cu_seqlens describes {packing.n} "
            f"sequences, {op.state_arg} holds {rows}"
        )
    if op.packs:
        call = op.prepare(**arguments, cu_seqlens=packing)
        if op.resolve(backend, call).packs:
            return op.run(backend, call)
    outs, finals = [], []
    for n, (start, stop) in enumerate(zip(packing.bounds, packing.bounds[1:], strict=False)):
        piece = dict(arguments)  # a copy per sequence
        for name in op.sequences:
            if isinstance(piece.get(name), Tensor):
                piece[name] = piece[name][:, start:stop]
        if state is not None:
            piece[op.state_arg] = _rows(state, n)
        o, final = op.run(backend, op.prepare(**piece))
        outs.append(o)
        finals.append(final)
    return torch.cat(outs, dim=1), join_rows(finals)


def padded_call(op: Op, backend: str, args: tuple[Any, ...], kwargs: dict[str, Any], attention_mask: object) -> Any:
    """``op`` over a padded batch: row b's real tokens are where ``attention_mask[b]`` is 1 (left or right
    padding). They are packed (the padding dropped, whatever it holds), run as sequences, and the outputs put
    back in place, zeros at the padding; the state of row b is that of its real tokens."""
    arguments = _bind(op, args, kwargs)
    if arguments is None:
        return op.run(backend, op.prepare(*args, **kwargs))  # the op's validation names the problem
    first = arguments[op.sequences[0]]
    B, T = first.shape[:2]
    mask, packing = unpad(attention_mask, B, T, first.device)
    for name in op.sequences:
        t = arguments.get(name)
        if isinstance(t, Tensor):
            arguments[name] = t[mask][None]  # (1, sum of lengths, ...): row by row, in order
    o, state = packed_call(op, backend, (), arguments, packing)
    return repad(o, mask), state
