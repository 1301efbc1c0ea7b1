"""Context parallelism: one batch of sequences split along time over the K ranks of a process group.

Rank ``r`` holds tokens ``[r L, (r+1) L)`` of every sequence (``shard`` cuts them out) and runs the model on
them inside ``with context_parallel(group, model=model):``, which installs the split on the model's mixers
(``TokenMixer.cp``). The built-in mixers then see where they are: rotary positions start at ``r L``, the short
convolution reads the previous ranks' last inputs (a halo), and the op starts from the *incoming state*, the
state after every earlier rank's tokens. How an op gets it is the op's own ``ContextParallelForm`` (what each
rank contributes, how the contributions combine), so any registered op can carry one, a plugin's included:

- retention and linear attention (LASP-2): each rank computes its tokens' own contribution to the state in
  closed form, ``S_local = sum_s gamma^(L-1-s) k_s^T v_s`` (linear attention: ``kv = sum_s k_s^T v_s``,
  ``z = sum_s k_s``), all-gathers these fixed-size states (one collective per layer) and sums those of the
  earlier ranks, ``S_in(r) = sum_{j<r} gamma^(L (r-1-j)) S_local(j)`` (the recurrence
  ``S_r = gamma^L S_(r-1) + S_local(r)`` unrolled; gamma = 1 for linear attention). The op then runs once on the
  rank's tokens from ``S_in(r)``. The closed form costs ``O(L Dk Dv)`` per head, far less than the op.
- softmax attention: keys and values are all-gathered and rank ``r`` attends over ranks ``0..r``'s (the
  earlier ones as a KV cache), so its memory and traffic grow with the whole sequence, as they must.

Every all-gather is differentiable (its backward is a reduce-scatter of the gradients), so a backward pass on
every rank sends each gradient back to the rank whose tokens it belongs to. Each rank's parameter gradients
are then its tokens' share: ``reduce_gradients`` sums them over the group, after which they equal the
single-process gradients of the summed loss. Forward outputs, input and parameter gradients equal the
single-process run up to rounding (the tests check 1e-10 in float64 on 2 gloo processes).

Requirements: every rank holds the same number of tokens; ``mode`` is ``"parallel"`` or ``"chunkwise"``
(training); no initial state, packed ``cu_seqlens`` or ``attention_mask``. Every rank must run the same
layers in the same order, forward and backward, as for any collective. Recomputed blocks
(``checkpoint_blocks``) rerun their forward during the backward pass: keep it inside the ``with`` block.

The state a mixer returns on rank ``r`` is the state after its last token, ``(r+1) L`` tokens in: the last
rank's equals the single-process final state.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mixers.interface import MixerState, TokenMixer

if TYPE_CHECKING:  # pragma: no cover
    from mixers.ops.base import Op
    from mixers.packing import Packing

__all__ = ["ContextParallel", "context_parallel", "reduce_gradients"]

CP_MODES = ("parallel", "chunkwise")

# The collectives under their newer names (torch 2.13 has them), else the older ones (the same operations).
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _AllGather(torch.autograd.Function):
    """``[n]`` on each rank -> ``[K * n]`` (rank order); backward: the gradients reduce-scattered back (summed)."""

    @staticmethod
    def forward(ctx: Any, flat: Tensor, group: Any, world_size: int) -> Tensor:
        ctx.group = group
        out = flat.new_empty(world_size * flat.numel())
        _all_gather_single(out, flat.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        out = grad.new_empty(grad.numel() // dist.get_world_size(ctx.group))
        _reduce_scatter_single(out, grad.contiguous(), group=ctx.group)
        return out, None, None


@dataclass(frozen=True)
class ContextParallel:
    """Rank ``rank`` of the ``world_size`` ranks that split each sequence, in process group ``group``."""

    group: Any
    rank: int
    world_size: int

    @classmethod
    def of(cls, group: Any = None) -> ContextParallel:
        """The context-parallel view of ``group`` (``None``: the default group, which must be initialised)."""
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("context parallelism needs torch.distributed initialised (init_process_group) first")
        return cls(group, dist.get_rank(group), dist.get_world_size(group))

    # --- the sequence split -------------------------------------------------------------------------------------

    def shard(self, x: Tensor, dim: int = 1) -> Tensor:
        """This rank's part of ``x`` along ``dim`` (time): the ``r``-th of ``world_size`` equal parts."""
        T = x.shape[dim]
        if T % self.world_size:
            raise ValueError(
                f"context parallelism splits the sequence into {self.world_size} equal parts, but its length {T} "
                f"is not divisible by {self.world_size}"
            )
        return x.narrow(dim, self.rank * (T // self.world_size), T // self.world_size)

    def unshard(self, x: Tensor, dim: int = 1) -> Tensor:
        """The whole sequence from every rank's part ``x`` (differentiable): the inverse of ``shard``."""
        (parts,) = self.all_gather(x)
        return torch.cat(parts.unbind(0), dim=dim)

    def all_gather(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        """Every rank's ``tensors`` (one dtype), each as ``[K, *shape]``, in one differentiable collective."""
        flat = torch.cat([t.reshape(-1) for t in tensors])
        gathered = _AllGather.apply(flat, self.group, self.world_size).view(self.world_size, -1)
        parts = gathered.split([t.numel() for t in tensors], dim=1)
        return tuple(p.view(self.world_size, *t.shape) for p, t in zip(parts, tensors, strict=True))

    def earlier(self, device: torch.device) -> Tensor:
        """``[K]`` float64: 1 for the ranks before this one, 0 for the others; what a rank's sums are weighted by.

        Every rank uses all that it gathered (zeros for the ranks it does not need), so every rank's backward
        pass reaches each all-gather, as the collective in its backward requires."""
        return (torch.arange(self.world_size, device=device) < self.rank).to(torch.float64)

    # --- the hooks of the built-in mixers -----------------------------------------------------------------------

    def begin(self, mixer: TokenMixer, x: Tensor, state: MixerState | None, packing: Packing | None) -> MixerState:
        """The state a mixer starts this rank's ``x [B, L, d]`` from: position ``r L`` (its op state and conv
        window come from the other ranks, through ``op`` and ``conv_window``)."""
        if not getattr(mixer, "context_parallel", False):
            raise NotImplementedError(f"{type(mixer).__name__} does not support context parallelism")
        if state is not None:
            raise ValueError("under context parallelism a mixer starts from the previous ranks, not from a state")
        if packing is not None:
            raise ValueError(
                "packed sequences (cu_seqlens, attention_mask) are not supported under context parallelism"
            )
        B, L = x.shape[0], x.shape[1]
        return mixer.state_type.start(None, B, device=x.device, offset=self.rank * L)

    def conv_window(self, x: Tensor, size: int) -> Tensor:
        """The ``size`` inputs before this rank's ``x [B, L, C]`` (a short convolution's window; zeros before
        the sequence), from the previous ranks' last ``min(L, size)`` inputs."""
        B, L, C = x.shape
        if size == 0:
            return x.new_zeros(B, 0, C)
        (tails,) = self.all_gather(x[:, L - min(L, size) :])
        return self.window_before(tails, size)

    def window_before(self, tails: Tensor, size: int) -> Tensor:
        """The ``size`` inputs before this rank's tokens (zeros before the sequence), from every rank's last inputs
        ``tails [K, B, m, C]`` (all-gathered): what a convolution over time continues from."""
        _, B, m, C = tails.shape
        before = tails[: self.rank].transpose(0, 1).reshape(B, self.rank * m, C)
        return torch.cat([tails.new_zeros(B, size, C), before], dim=1)[:, before.shape[1] :]

    def run(
        self,
        op: Op,
        *args: Any,
        backend: str = "auto",
        cu_seqlens: object = None,
        attention_mask: object = None,
        **kwargs: Any,
    ) -> tuple[Tensor, Any]:
        """``op(*args, **kwargs)`` on this rank's tokens, from what the earlier ranks leave: the op's
        ``ContextParallelForm`` says what each rank contributes (gathered here in one collective) and how the
        contributions make this rank's arguments."""
        form = op.context_parallel
        if form is None:
            raise NotImplementedError(f"op {op.name!r} has no context-parallel form (Op.context_parallel)")
        arguments = op.arguments(*args, **kwargs)
        mode = arguments.get("mode")
        if mode not in CP_MODES:
            raise ValueError(f"under context parallelism mode must be one of {CP_MODES} (training), got {mode!r}")
        if arguments.get(op.state_arg) is not None:
            raise ValueError("under context parallelism the op's initial state comes from the previous ranks")
        if cu_seqlens is not None or attention_mask is not None:
            raise ValueError(
                "packed sequences (cu_seqlens, attention_mask) are not supported under context parallelism"
            )
        gathered = self.all_gather(*form.local(arguments))
        return op(**form.incoming(self, gathered, arguments), backend=backend)


@contextmanager
def context_parallel(group: Any = None, *, model: nn.Module) -> Iterator[ContextParallel]:
    """Run ``model``'s mixers context-parallel over ``group`` (``None``: the default group) inside the block.

    Installs the ``ContextParallel`` on every mixer of ``model`` (``TokenMixer.cp``), which is all a mixer reads:
    no global state, so two models (one split, one not) can run side by side. Every mixer must support it (a
    plugin mixer that does not would otherwise treat each rank's tokens as a sequence of their own). On exit the
    mixers are as before."""
    cp = ContextParallel.of(group)
    mixers = [m for m in model.modules() if isinstance(m, TokenMixer)]
    unsupported = sorted({type(m).__name__ for m in mixers if not getattr(m, "context_parallel", False)})
    if unsupported:
        raise NotImplementedError(f"these mixers do not support context parallelism: {', '.join(unsupported)}")
    previous = [m.cp for m in mixers]
    for m in mixers:
        m.cp = cp
    try:
        yield cp
    finally:
        for m, before in zip(mixers, previous, strict=True):
            m.cp = before


def reduce_gradients(model: nn.Module, group: Any = None) -> None:
    """Sum every parameter's gradient over ``group`` (in place): after a context-parallel backward pass each
    rank holds only its tokens' share. One all-reduce per gradient dtype and device."""
    buckets: dict[tuple[torch.dtype, torch.device], list[Tensor]] = defaultdict(list)
    for p in model.parameters():
        if p.grad is not None:
            buckets[(p.grad.dtype, p.grad.device)].append(p.grad)
    for grads in buckets.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=group)
        for g, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            g.copy_(part.view_as(g))
