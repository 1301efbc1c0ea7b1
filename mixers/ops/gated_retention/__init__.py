"""The ``gated_retention`` op: retention whose decay is data-dependent, one log decay per token and head.

``S_t = exp(g_t) S_{t-1} + k_t^T v_t`` and ``o_t = q_t S_t``, that is
``o_t = sum_{s<=t} exp(g_{s+1} + ... + g_t) (q_t . k_s) v_s + exp(g_1 + ... + g_t) q_t S_0`` (YOCO's gated
retention, Sun et al. 2024, section 2.2; the scalar-gate recurrence of GLA's simple variant and of Mamba-2's SSD).
With ``g = log(gamma)`` for every token it is ``retention``; with ``g = 0``, linear attention without normaliser.

Its state is ``S [B, H, Dk, Dv]`` (float32; float64 for float64 inputs). Its float64 reference is in
``reference.py``, its conformance spec in ``testing.py``; its torch backend in
``mixers/backends/torch_gated_retention.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor

from mixers.hookspecs import hookimpl
from mixers.ops.base import ContextParallelForm, Op, OpCall
from mixers.ops.checks import _shape, check_mode, check_qkv, check_state, state_dtype

if TYPE_CHECKING:  # pragma: no cover
    from mixers.packing import Packing


class GatedRetentionBackend(Protocol):
    """What a gated-retention backend's ``fn`` is called with (validated) and returns: ``(o, final_state)``."""

    def __call__(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        g: Tensor,  # [B, T, H] log decays (<= 0; -inf: the state is forgotten), any floating dtype
        *,
        mode: str,
        chunk_size: int | None,  # an int in chunkwise mode, else None
        initial_state: Tensor | None,  # [B, H, Dk, Dv] in state_dtype(q.dtype)
        cu_seqlens: Packing | None = None,  # only for a backend with packs=True: B = 1, a state row per sequence
    ) -> tuple[Tensor, Tensor]: ...


def check_decays(g: Tensor, q: Tensor) -> None:
    """``g`` is a floating-point tensor ``[B, T, H]`` matching q, on q's device. Its values are not checked
    (that would make the host wait for the device): a mixer makes them ``<= 0`` with a ``logsigmoid``."""
    if not isinstance(g, Tensor):
        raise TypeError(f"g must be a torch.Tensor [B, T, H] of log decays, got {type(g).__name__}")
    if tuple(g.shape) != tuple(q.shape[:3]):
        raise ValueError(f"g must be [B, T, H] = {list(q.shape[:3])} (the log decays of q's tokens), got {_shape(g)}")
    if not g.is_floating_point():
        raise TypeError(f"g must be a floating-point tensor of log decays, got dtype {g.dtype}")
    if g.device != q.device:
        raise ValueError(f"g must be on q's device {q.device}, got {g.device}")


def prepare(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    *,
    mode: str,
    chunk_size: int | None = None,
    initial_state: Tensor | None = None,
    cu_seqlens: Packing | None = None,
) -> OpCall:
    """Validate a gated-retention call (see ``mixers.functional.gated_retention``); with ``cu_seqlens`` (packed
    sequences in one row), the state has a row per sequence."""
    B, T, H, Dk, Dv = check_qkv(q, k, v)
    check_decays(g, q)
    chunk = check_mode(mode, chunk_size)
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
        describe=lambda: f"q {_shape(q)}, v {_shape(v)}, g {_shape(g)}",
    )


def later_sums(g: Tensor, dim: int = 1) -> Tensor:
    """``sum_{u>s} g_u`` along ``dim`` (time) for each position s of ``g``, summed from the end: how much token s's
    contribution decays by the end. Exact for -inf entries (no ``total - cumsum`` difference)."""
    rev = g.flip(dim).cumsum(dim).flip(dim)  # sum_{u>=s}
    return torch.cat([rev.narrow(dim, 1, rev.shape[dim] - 1), torch.zeros_like(rev.narrow(dim, 0, 1))], dim=dim)


def _local(arguments: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """This rank's L tokens by themselves: the state they leave, ``sum_s exp(sum_{u>s} g_u) k_s^T v_s``, and
    their total log decay ``sum_u g_u`` ``[B, H]`` (the decay they put on any earlier state)."""
    q, k, v, g = arguments["q"], arguments["k"], arguments["v"], arguments["g"]
    sd = state_dtype(q.dtype)
    g = g.to(torch.float64)
    weight = later_sums(g).exp().to(sd)  # [B, L, H]
    state = torch.einsum("bshk,bshv->bhkv", k.to(sd) * weight[..., None], v.to(sd))
    return state, g.sum(1).to(sd)


def _incoming(cp: Any, gathered: tuple[Tensor, ...], arguments: dict[str, Any]) -> dict[str, Any]:
    """The state after the earlier ranks, ``S_in(r) = sum_{j<r} exp(A_{j+1} + ... + A_{r-1}) S_local(j)`` (the
    recurrence ``S_r = exp(A_r) S_(r-1) + S_local(r)`` unrolled; ``A_m`` rank m's total log decay), from every
    rank's ``[K, B, H, Dk, Dv]`` states and ``[K, B, H]`` totals. The sums between ranks are masked sums, not
    differences of running sums, so a -inf (a forgetting token) stays exact."""
    states, totals = gathered
    K = states.shape[0]
    m = torch.arange(K, device=states.device)
    between = (m[:, None] < m[None, :]) & (m[None, :] < cp.rank)  # [j, m]: j < m < r
    logs = torch.where(between[:, :, None, None], totals[None], totals.new_zeros(())).sum(1)  # [K, B, H]
    weights = logs.exp() * cp.earlier(states.device).to(states.dtype)[:, None, None]  # zero for j >= r
    return {**arguments, "initial_state": torch.einsum("jbhkv,jbh->bhkv", states, weights)}


GATED_RETENTION = Op(
    "gated_retention",
    prepare,
    GatedRetentionBackend,
    state_type=Tensor,
    reference="mixers.ops.gated_retention.reference:gated_retention_reference",
    testing="mixers.ops.gated_retention.testing:SPEC",
    description="gated retention (YOCO): retention with a data-dependent decay per token and head",
    sequences=("q", "k", "v", "g"),
    context_parallel=ContextParallelForm(_local, _incoming),
)


@hookimpl
def register_ops(register) -> None:  # noqa: ANN001 - an OpRegistrar
    register(GATED_RETENTION)
