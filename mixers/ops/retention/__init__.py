"""The ``retention`` op: ``o_t = sum_{s<=t} gamma^(t-s) (q_t . k_s) v_s + gamma^(t+1) q_t S_0``.

Its state is ``S [B, H, Dk, Dv]`` (float32; float64 for float64 inputs). Its float64 reference is in
``reference.py``, its conformance spec (hypothesis cases) in ``testing.py``; its backends are registered
through ``register_backends`` (the torch one in ``mixers/backends/torch_retention.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor

from mixers.hookspecs import hookimpl
from mixers.ops.base import ContextParallelForm, Op, OpCall
from mixers.ops.checks import _shape, check_gamma, check_mode, check_qkv, check_state, state_dtype

if TYPE_CHECKING:  # pragma: no cover
    from mixers.packing import Packing


class RetentionBackend(Protocol):
    """What a retention backend's ``fn`` is called with (validated) and returns: ``(o, final_state)``."""

    def __call__(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        gamma: Tensor,  # float64 [H], 0 < gamma <= 1
        *,
        mode: str,
        chunk_size: int | None,  # an int in chunkwise mode, else None
        initial_state: Tensor | None,  # [B, H, Dk, Dv] in state_dtype(q.dtype)
        cu_seqlens: Packing | None = None,  # only for a backend with packs=True: B = 1, a state row per sequence
    ) -> tuple[Tensor, Tensor]: ...


def prepare(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gamma: Tensor | float | Sequence[float],
    *,
    mode: str,
    chunk_size: int | None = None,
    initial_state: Tensor | None = None,
    cu_seqlens: Packing | None = None,
) -> OpCall:
    """Validate a retention call (see ``mixers.functional.retention``); with ``cu_seqlens`` (packed sequences in
    one row), the state has a row per sequence."""
    B, T, H, Dk, Dv = check_qkv(q, k, v)
    chunk = check_mode(mode, chunk_size)
    g = check_gamma(gamma, H, q.device)
    sd = state_dtype(q.dtype)
    rows = B if cu_seqlens is None else cu_seqlens.n
    check_state(initial_state, "initial_state", (rows, H, Dk, Dv), sd, q.device)
    packed = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}
    return OpCall(
        args=(q, k, v, g),
        kwargs={"mode": mode, "chunk_size": chunk, "initial_state": initial_state, **packed},
        device=q.device,
        dtype=q.dtype,
        mode=mode,
        o=("o", (B, T, H, Dv), "[B, T, H, Dv]", q.dtype),
        state=[("final_state", (rows, H, Dk, Dv), "[B, H, Dk, Dv]", sd)],
        describe=lambda: f"q {_shape(q)}, v {_shape(v)}",
    )


def _local(arguments: dict[str, Any]) -> tuple[Tensor]:
    """The state this rank's L tokens leave by themselves: ``sum_s gamma^(L-1-s) k_s^T v_s`` (closed form)."""
    q, k, v = arguments["q"], arguments["k"], arguments["v"]
    L, H = k.shape[1], k.shape[2]
    sd = state_dtype(q.dtype)
    g = check_gamma(arguments["gamma"], H, q.device)  # float64 [H]
    decay = g ** torch.arange(L - 1, -1, -1, device=q.device, dtype=torch.float64)[:, None]  # gamma^(L-1-s)
    return (torch.einsum("bshk,bshv->bhkv", k.to(sd) * decay.to(sd)[:, :, None], v.to(sd)),)


def _incoming(cp: Any, gathered: tuple[Tensor, ...], arguments: dict[str, Any]) -> dict[str, Any]:
    """The state after the earlier ranks: ``S_in(r) = sum_{j<r} gamma^(L (r-1-j)) S_local(j)`` (the recurrence
    ``S_r = gamma^L S_(r-1) + S_local(r)`` unrolled), from every rank's local state ``[K, B, H, Dk, Dv]``."""
    (states,) = gathered
    q = arguments["q"]
    L, H = q.shape[1], q.shape[2]
    g = check_gamma(arguments["gamma"], H, q.device)
    hops = (cp.rank - 1 - torch.arange(cp.world_size, device=q.device)).clamp(min=0)
    weights = (g**L)[None] ** hops[:, None] * cp.earlier(q.device)[:, None]  # [K, H]: gamma^(L (r-1-j)), j < r
    incoming = torch.einsum("jbhkv,jh->bhkv", states, weights.to(states.dtype))
    return {**arguments, "initial_state": incoming}


RETENTION = Op(
    "retention",
    prepare,
    RetentionBackend,
    state_type=Tensor,
    reference="mixers.ops.retention.reference:retention_reference",
    testing="mixers.ops.retention.testing:SPEC",
    description="retention (RetNet): decayed causal linear attention, parallel / chunkwise / recurrent",
    context_parallel=ContextParallelForm(_local, _incoming),
)


@hookimpl
def register_ops(register) -> None:  # noqa: ANN001 - an OpRegistrar
    register(RETENTION)
