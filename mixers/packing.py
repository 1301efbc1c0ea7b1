"""Packed variable-length sequences and padded batches: the one value that carries them, ``Packing``.

Sequence ``n`` of a packed input ``[1, T, ...]`` is tokens ``cu_seqlens[n] .. cu_seqlens[n+1] - 1`` (as fla takes
it); each starts from its own state and nothing crosses a boundary. ``Packing`` is ``cu_seqlens`` checked once,
with what every layer needs from it; the model makes it and hands it down under the one name ``cu_seqlens`` to the
mixers, the ops and the backends that pack (``Backend.packs``). A padded batch (``attention_mask``) becomes one by
``unpad``. A leaf module: it imports nothing of the library but ``mixers.structure``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mixers.structure import map_structure, tensors_in


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

    @functools.cached_property
    def sizes(self) -> tuple[int, ...]:
        """Each sequence's length, as Python ints (no device sync)."""
        return tuple(b - a for a, b in zip(self.bounds, self.bounds[1:], strict=False))

    @property
    def longest(self) -> int:
        """The length of the longest sequence."""
        return max(self.sizes)

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
