"""The token-mixer interface every mixer implements, and the self-describing state it hands over."""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor, nn

S = TypeVar("S", bound="MixerState")


@dataclass
class MixerState:
    """What a mixer carries from one call to the next.

    ``offset`` is the number of tokens already consumed, so positions (rotations) continue where the
    previous call stopped: ``mixer(x[:, :t])`` then ``mixer(x[:, t:], state)`` equals ``mixer(x)``.
    Subclasses add tensor fields whose first dimension is the batch.
    """

    offset: int

    def map_tensors(self: S, fn: Callable[[Tensor], Tensor]) -> S:
        """A copy with ``fn`` applied to every tensor field."""
        changes = {
            f.name: fn(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        return dataclasses.replace(self, **changes)

    def detach(self: S) -> S:
        """Cut the autograd history (truncated backpropagation through time)."""
        return self.map_tensors(Tensor.detach)

    def to(self: S, device: torch.device | str) -> S:
        return self.map_tensors(lambda t: t.to(device))

    def reorder(self: S, index: Tensor) -> S:
        """Select/reorder batch entries (beam search): every tensor's batch dimension is indexed."""
        return self.map_tensors(lambda t: t.index_select(0, index))

    @property
    def batch_size(self) -> int:
        """The batch size the state was built for (the first dimension of its tensors)."""
        for f in dataclasses.fields(self):
            if isinstance(t := getattr(self, f.name), Tensor):
                return t.shape[0]
        raise TypeError(f"{type(self).__name__} has no tensor field to tell its batch size")

    @property
    def nbytes(self) -> int:
        """Memory held by the state's tensors."""
        return sum(
            t.numel() * t.element_size()
            for f in dataclasses.fields(self)
            if isinstance(t := getattr(self, f.name), Tensor)
        )


class TokenMixer(nn.Module, abc.ABC):
    """A sequence mixer: ``[B, T, d_model] -> [B, T, d_model]``, in three equivalent modes.

    ``mode="parallel"`` processes the whole sequence at once (training), ``"chunkwise"`` in chunks of
    ``chunk_size`` tokens (long sequences), ``"recurrent"`` token by token (decoding). All modes give
    the same output, and the returned state continues the sequence in any mode.
    """

    d_model: int
    state_type: type[MixerState] = MixerState  # the state class a subclass hands over

    @abc.abstractmethod
    def forward(
        self, x: Tensor, state: MixerState | None = None, *, mode: str = "parallel", chunk_size: int | None = None
    ) -> tuple[Tensor, MixerState]:
        """Mix ``x [B, T, d_model]``, continuing from ``state``; return ``(y, new_state)``."""

    @abc.abstractmethod
    def init_state(
        self, batch_size: int, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> MixerState:
        """The state before any token (for inputs of ``dtype`` on ``device``)."""

    def check_input(self, x: Tensor) -> tuple[int, int]:
        """Check ``x`` is ``[B, T, d_model]`` floating point; return ``(B, T)``."""
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor [B, T, {self.d_model}], got {type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape [B, T, d_model={self.d_model}], got {list(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        return x.shape[0], x.shape[1]

    def check_state(self, state: MixerState | None, batch_size: int) -> MixerState | None:
        """Check that ``state`` is ``None`` or this mixer's kind of state, built for ``batch_size``."""
        if state is None:
            return None
        if not isinstance(state, self.state_type):
            raise TypeError(f"state must be a {self.state_type.__name__} (from this mixer), got {type(state).__name__}")
        if state.batch_size != batch_size:
            raise ValueError(
                f"state ({type(state).__name__}) is for batch size {state.batch_size}, "
                f"but x has batch size {batch_size}"
            )
        return state
