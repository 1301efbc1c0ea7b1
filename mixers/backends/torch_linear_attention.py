"""Causal linear attention in pure torch: the reference backend, differentiable by autograd.

Un-normalised causal linear attention is retention with ``gamma = 1``, so this backend runs the
retention backend (``torch_retention``: parallel, chunkwise with any chunk size, recurrent, and its
hand-written backward) rather than a second copy of it. The normaliser ``q_t . z_t`` is the numerator
with every value replaced by 1, so the values get a column of ones appended: one pass carries
``[kv | z]`` as a single ``[Dk, Dv + 1]`` state and yields numerator and denominator together.

Non-finite inputs are excluded as in the retention backend; with gradients, before the normaliser, whose
backward would otherwise meet the NaN of a later output with a zero gradient.

Packed sequences (``cu_seqlens``, a ``mixers.packing.Packing``; registered with ``packs=True``) go through the
retention backend's packed path the same way: all sequences of the row in one pass (``torch_retention``'s module
docstring says how, mode by mode), ``initial_state`` and the final state a ``LinearState`` with a row per
sequence.

Inputs arrive validated by ``mixers.functional.linear_attention``. Computation runs in float32
(float64 for float64 inputs); ``o`` is cast back to the input dtype.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mixers.backends import nonfinite, torch_retention
from mixers.catalogue import Backend, BackendRegistrar
from mixers.hookspecs import hookimpl
from mixers.ops.checks import state_dtype
from mixers.ops.linear_attention import LinearState

if TYPE_CHECKING:  # pragma: no cover
    from mixers.packing import Packing


def guard(den: Tensor, eps: float) -> Tensor:
    """Move ``den`` at least ``eps`` away from zero, keeping its sign (``+eps`` for 0)."""
    return torch.where(den < 0, den.clamp(max=-eps), den.clamp(min=eps))


def linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mode: str,
    chunk_size: int | None,
    initial_state: LinearState | None,
    normalize: bool,
    eps: float,
    cu_seqlens: Packing | None = None,
) -> tuple[Tensor, LinearState]:
    """The torch backend of ``mixers.functional.linear_attention`` (inputs already validated).

    ``cu_seqlens`` (``packs=True``): q, k, v ``[1, T, H, D]`` hold ``cu_seqlens.n`` sequences back to back,
    ``initial_state`` is None or a ``LinearState(kv [n, H, Dk, Dv], z [n, H, Dk])``; returns ``o [1, T, H, Dv]``
    and the final ``LinearState`` with ``n`` rows, each sequence computed from its own initial row alone."""
    out_dtype = q.dtype
    acc = state_dtype(q.dtype)
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    state = None if initial_state is None else torch.cat([initial_state.kv, initial_state.z[..., None]], dim=-1)
    if T == 0:
        if initial_state is None:
            rows = B if cu_seqlens is None else cu_seqlens.n
            initial_state = LinearState(q.new_zeros(rows, H, Dk, Dv, dtype=acc), q.new_zeros(rows, H, Dk, dtype=acc))
        return v.new_empty(B, 0, H, Dv), initial_state
    found = None
    if nonfinite.recording(q, k, v, state):  # (the normaliser's backward too must meet no NaN)
        (q, k, v), found = nonfinite.finite_parts(q, k, v, cu_seqlens)
    v = torch.cat([v.to(acc), v.new_ones(B, T, H, 1, dtype=acc)], dim=-1)  # the ones column makes the normaliser
    no_decay = torch.ones(H, dtype=torch.float64, device=q.device)
    o, state = torch_retention.compute(
        q.to(acc), k.to(acc), v, no_decay, mode=mode, chunk_size=chunk_size, initial_state=state, cu_seqlens=cu_seqlens
    )  # (B, T, H, Dv + 1)
    num, den = o[..., :Dv], o[..., Dv:]
    o = (num / guard(den, eps) if normalize else num).to(out_dtype)
    o, kv, z = nonfinite.marked(found, o, state[..., :Dv].contiguous(), state[..., Dv].contiguous())
    return o, LinearState(kv, z)


@hookimpl
def register_backends(register: BackendRegistrar) -> None:
    register(
        Backend(
            op="linear_attention",
            name="torch",
            fn=linear_attention,
            priority=0,
            packs=True,
            description="pure torch; any device and dtype; differentiable by autograd",
        )
    )
