"""The token-mixer interface every mixer implements, and the one state type every mixer hands over.

A mixer's state is its op's state (a tensor, a ``LinearState``, a ``KVCache``: whatever the op returns and
takes back) plus a per-row position tensor ``pos [B]``, so the rows of a batch may be at different positions
(packed or ragged batches) and a compiled decode step sees positions as data, not as Python ints that would
recompile it at every token.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from mixers.packing import Packing, join_rows, repad, unpad
from mixers.registry import current_registry
from mixers.structure import map_structure, tensors_in

S = TypeVar("S", bound="MixerState")


@dataclass
class MixerState:
    """What a mixer carries from one call to the next.

    ``pos``: int64 ``[B]``, the tokens each row has consumed, which is the position its next token is at:
    positions (rotations) continue where the previous call stopped, so ``mixer(x[:, :t])`` then
    ``mixer(x[:, t:], state)`` equals ``mixer(x)``. ``op``: the op's state, exactly as the op returns and
    takes it (``None`` for a mixer without one). ``conv``: a short convolution's window, if the mixer has one.
    A plugin mixer may subclass this to add fields (tensors whose first dimension is the batch).
    """

    pos: Tensor
    op: Any = None
    conv: Tensor | None = None

    @classmethod
    def start(
        cls: type[S], op: Any, batch_size: int, *, device: torch.device | str | None = None, offset: int = 0, **fields
    ) -> S:
        """A state whose rows are all at position ``offset`` (0: before any token)."""
        pos = torch.full((batch_size,), offset, dtype=torch.int64, device=device)
        return cls(pos=pos, op=op, **fields)

    @property
    def offset(self) -> int:
        """The position of every row, when all rows are at one (a device sync); ``ValueError`` otherwise."""
        if self.pos.numel() == 0:
            return 0
        lo, hi = int(self.pos.min()), int(self.pos.max())
        if lo != hi:
            raise ValueError(f"the rows of this state are at different positions ({lo} to {hi}); read state.pos")
        return lo

    def map_tensors(self: S, fn: Callable[[Tensor], Tensor]) -> S:
        """A copy with ``fn`` applied to every tensor, ``pos`` and those inside ``op`` included."""
        changes = {f.name: map_structure(getattr(self, f.name), fn) for f in dataclasses.fields(self)}
        return dataclasses.replace(self, **changes)

    def detach(self: S) -> S:
        """Cut the autograd history (truncated backpropagation through time)."""
        return self.map_tensors(Tensor.detach)

    def to(self: S, device: torch.device | str) -> S:
        return self.map_tensors(lambda t: t.to(device))

    def reorder(self: S, index: Tensor) -> S:
        """Select/reorder batch entries (beam search): every tensor's batch dimension is indexed."""
        return self.map_tensors(lambda t: t.index_select(0, index))

    @classmethod
    def cat(cls: type[S], states: list[S]) -> S:
        """One state whose rows are those of ``states``, in order (an op state's own ``cat`` is used where it
        has one: KV caches of different capacities join that way)."""
        first = states[0]
        changes = {}
        for f in dataclasses.fields(first):
            values = [getattr(s, f.name) for s in states]
            changes[f.name] = None if values[0] is None else join_rows(values)
        return dataclasses.replace(first, **changes)

    @property
    def batch_size(self) -> int:
        """The batch size the state was built for."""
        return self.pos.shape[0]

    @property
    def nbytes(self) -> int:
        """Memory held by the state's tensors."""
        return sum(
            t.numel() * t.element_size() for f in dataclasses.fields(self) for t in tensors_in(getattr(self, f.name))
        )


def check_positions(pos: object, batch_size: int, device: torch.device) -> Tensor:
    """``pos`` must be an int64 tensor ``[batch_size]`` on ``device``."""
    if not isinstance(pos, Tensor):
        raise TypeError(f"state.pos must be an int64 tensor [B] of positions, got {type(pos).__name__}")
    if pos.dtype != torch.int64 or tuple(pos.shape) != (batch_size,):
        raise ValueError(
            f"state.pos must be an int64 tensor [B] = [{batch_size}], got {pos.dtype} of shape {list(pos.shape)}"
        )
    if pos.device != device:
        raise ValueError(f"state.pos must be on the device of x, {device}, got {pos.device}")
    return pos


class TokenMixer(nn.Module, abc.ABC):
    """A sequence mixer: ``[B, T, d_model] -> [B, T, d_model]``, in three equivalent modes.

    ``mode="parallel"`` processes the whole sequence at once (training), ``"chunkwise"`` in chunks of
    ``chunk_size`` tokens (long sequences), ``"recurrent"`` token by token (decoding). All modes give
    the same output, and the returned state continues the sequence in any mode.

    ``ops`` names the registered ops the mixer computes with and ``backend`` the backend it runs them on
    (``"auto"``: the best available for the inputs); ``set_backend`` switches it, checked against the registry.
    ``op_state_type`` is the type of ``state.op`` (for messages when a state from another mixer comes in).
    ``packs``: ``forward`` takes ``cu_seqlens`` (packed sequences) itself; otherwise ``mix_packed`` runs the mixer
    once per sequence.
    """

    d_model: int
    backend: str = "auto"
    ops: ClassVar[tuple[str, ...]] = ()
    packs: ClassVar[bool] = False
    op_state_type: ClassVar[type | tuple[type, ...] | None] = None
    state_type: ClassVar[type[MixerState]] = MixerState
    cp: Any = None  # the ContextParallel split this mixer runs under, installed by mixers.context_parallel

    @abc.abstractmethod
    def forward(
        self, x: Tensor, state: MixerState | None = None, *, mode: str = "parallel", chunk_size: int | None = None
    ) -> tuple[Tensor, MixerState]:
        """Mix ``x [B, T, d_model]``, continuing from ``state``; return ``(y, new_state)``."""

    @abc.abstractmethod
    def init_state(
        self,
        batch_size: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        max_len: int | None = None,
    ) -> MixerState:
        """The state before any token (for inputs of ``dtype`` on ``device``). ``max_len``: the most tokens the
        state will see, for a state that grows with them (a KV cache) to preallocate; fixed-size states ignore it."""

    def set_backend(self, backend: str) -> None:
        """Run this mixer's ops on ``backend`` (``"auto"`` or a backend registered for each of ``ops``).

        Checked here, so a typo fails when the model is built or switched, not at the first forward pass."""
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a str ('auto' or a backend name), got {type(backend).__name__}")
        if backend != "auto" and self.ops:
            current_registry().check_backend_name(self.ops, backend, type(self).__name__)
        self.backend = backend

    def check_input(self, x: Tensor) -> tuple[int, int]:
        """Check ``x`` is ``[B, T, d_model]`` floating point; return ``(B, T)``."""
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor [B, T, {self.d_model}], got {type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape [B, T, d_model={self.d_model}], got {list(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        return x.shape[0], x.shape[1]

    def check_state(
        self,
        state: MixerState | None,
        batch_size: int,
        device: torch.device | None = None,
        cu_seqlens: Packing | None = None,
    ) -> Any:
        """Check that ``state`` is ``None`` or this mixer's kind of state, built for ``batch_size`` rows on
        ``device`` (with ``cu_seqlens``: a row per sequence); return it."""
        if state is None:
            return None
        if not isinstance(state, self.state_type):
            raise TypeError(f"state must be a {self.state_type.__name__} (from this mixer), got {type(state).__name__}")
        if cu_seqlens is not None:
            rows = state.pos.shape[0] if isinstance(state.pos, Tensor) and state.pos.dim() == 1 else None
            if rows != cu_seqlens.n:
                raise ValueError(
                    f"with cu_seqlens, the state must hold one row per sequence: cu_seqlens describes {cu_seqlens.n} "
                    f"sequences, the state holds {rows}"
                )
            batch_size = cu_seqlens.n
        if isinstance(state.pos, Tensor) and state.pos.dim() == 1 and state.pos.shape[0] != batch_size:
            raise ValueError(
                f"state ({type(state).__name__}) is for batch size {state.pos.shape[0]}, "
                f"but x has batch size {batch_size}"
            )
        check_positions(state.pos, batch_size, state.pos.device if device is None else device)
        kind = self.op_state_type
        if kind is not None and not isinstance(state.op, kind):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise TypeError(
                f"state.op must be a {names} (the state of {type(self).__name__}'s op), got {type(state.op).__name__}:"
                f" was the state made by another mixer?"
            )
        return state

    def positions(self, state: MixerState | None, cu_seqlens: Packing | None = None) -> Tensor | None:
        """``state.pos``, or ``None`` for a fresh sequence (every row at 0, which mixers may take a faster path for).

        With ``cu_seqlens`` (packed sequences in one row), the position of every token: ``[1, T]``, restarting at
        each sequence's start (at ``state.pos[n]`` for sequence n, with a state)."""
        if cu_seqlens is None:
            return None if state is None else state.pos
        pos = cu_seqlens.offsets if state is None else cu_seqlens.offsets + state.pos[cu_seqlens.seq_id]
        return pos[None]

    def next_state(
        self, state: MixerState | None, x: Tensor, op: Any, cu_seqlens: Packing | None = None, **fields: Any
    ) -> MixerState:
        """The state after ``x [B, T, ...]``: positions advanced by T, the op's new state, other fields. With
        ``cu_seqlens``, one row per sequence, each advanced by its length."""
        if cu_seqlens is not None:
            pos = cu_seqlens.lengths if state is None else state.pos + cu_seqlens.lengths
            return self.state_type(pos=pos, op=op, **fields)
        B, T = x.shape[0], x.shape[1]
        if state is None:
            return self.state_type.start(op, B, device=x.device, offset=T, **fields)
        return self.state_type(pos=state.pos + T, op=op, **fields)

    def check_packing(self, x: Tensor, cu_seqlens: object) -> Packing | None:
        """``cu_seqlens`` checked for ``x [1, T, d_model]`` (``None`` stays ``None``)."""
        if cu_seqlens is None:
            return None
        if x.shape[0] != 1:
            raise ValueError(
                f"with cu_seqlens, x must hold the packed sequences in one row ([1, T, {self.d_model}]), "
                f"got batch size {x.shape[0]}"
            )
        return Packing.of(cu_seqlens, x.shape[1], x.device)


def mix_packed(
    mixer: TokenMixer,
    x: Tensor,
    state: MixerState | None,
    cu_seqlens: Tensor | Packing,
    *,
    mode: str = "parallel",
    chunk_size: int | None = None,
) -> tuple[Tensor, MixerState]:
    """Any mixer over packed sequences ``x [1, T, d]`` (``cu_seqlens``: ``[N+1]`` or a ``Packing``): nothing
    crosses a boundary, positions restart at each sequence, and the state has one row per sequence.

    A mixer that takes ``cu_seqlens`` (``packs = True``) gets it; any other runs once per sequence, from that
    sequence's rows of ``state``, which is exact for every mixer and costs a call per sequence."""
    cu_seqlens = mixer.check_packing(x, cu_seqlens)
    if mixer.packs:
        return mixer(x, state, mode=mode, chunk_size=chunk_size, cu_seqlens=cu_seqlens)
    mixer.check_input(x)
    state = mixer.check_state(state, 1, x.device, cu_seqlens)
    outs, states = [], []
    for n, (start, stop) in enumerate(zip(cu_seqlens.bounds, cu_seqlens.bounds[1:], strict=False)):
        rows = None if state is None else state.reorder(torch.tensor([n], device=x.device))
        y, s = mixer(x[:, start:stop], rows, mode=mode, chunk_size=chunk_size)
        outs.append(y)
        states.append(s)
    return torch.cat(outs, dim=1), type(states[0]).cat(states)


def mix_padded(
    mixer: TokenMixer,
    x: Tensor,
    state: MixerState | None,
    attention_mask: Tensor,
    *,
    mode: str = "parallel",
    chunk_size: int | None = None,
) -> tuple[Tensor, MixerState]:
    """Any mixer over a padded batch ``x [B, T, d]``: row b's tokens are where ``attention_mask [B, T]`` is 1
    (left or right padding). The real tokens are packed (the padding dropped, whatever it holds) and run by
    ``mix_packed``; outputs at the padding are zeros, and row b's state is that of its real tokens."""
    B, T = mixer.check_input(x)
    mask, cu_seqlens = unpad(attention_mask, B, T, x.device)
    y, state = mix_packed(mixer, x[mask][None], state, cu_seqlens, mode=mode, chunk_size=chunk_size)
    return repad(y, mask), state
