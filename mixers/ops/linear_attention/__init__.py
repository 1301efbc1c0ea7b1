"""The ``linear_attention`` op: causal linear attention (Katharopoulos et al. 2020) on feature-mapped q, k.

Its state is a ``LinearState(kv, z)``. Its float64 reference is in ``reference.py``, its conformance spec in
``testing.py``; the torch backend is ``mixers/backends/torch_linear_attention.py``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import torch
from torch import Tensor

from mixers.hookspecs import hookimpl
from mixers.ops.base import ContextParallelForm, Op, OpCall
from mixers.ops.checks import _shape, check_mode, check_qkv, check_state, state_dtype

if TYPE_CHECKING:  # pragma: no cover
    from mixers.packing import Packing


class LinearState(NamedTuple):
    """Linear attention's state after ``t`` tokens: ``kv = sum_s k_s^T v_s`` ``[B, H, Dk, Dv]`` and the
    normaliser ``z = sum_s k_s`` ``[B, H, Dk]`` (float32, or float64 for float64 inputs)."""

    kv: Tensor
    z: Tensor


def _check_pair(state: object, name: str, fields: str) -> tuple[object, object] | None:
    if state is None:
        return None
    if not isinstance(state, (tuple, list)) or len(state) != 2:
        raise TypeError(f"{name} must be None or a pair {fields}, got {type(state).__name__}")
    return state[0], state[1]


def check_linear_state(
    state: object, B: int, H: int, Dk: int, Dv: int, dtype: torch.dtype, device: torch.device
) -> LinearState | None:
    """Check a linear-attention state ``(kv [B, H, Dk, Dv], z [B, H, Dk])``; return it as a ``LinearState``."""
    pair = _check_pair(state, "initial_state", "(kv [B, H, Dk, Dv], z [B, H, Dk]) such as a LinearState")
    if pair is None:
        return None
    kv, z = pair
    if kv is None or z is None:
        raise TypeError("initial_state must hold two tensors (kv, z), got None in it")
    check_state(kv, "initial_state.kv", (B, H, Dk, Dv), state_dtype(dtype), device)
    check_state(z, "initial_state.z", (B, H, Dk), state_dtype(dtype), device)
    return LinearState(kv, z)


def check_eps(eps: float) -> float:
    """Check a denominator guard: a finite float > 0."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0 < eps < math.inf):
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    return float(eps)


class LinearAttentionBackend(Protocol):
    """What a linear-attention backend's ``fn`` is called with (validated) and returns: ``(o, (kv, z))``."""

    def __call__(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        mode: str,
        chunk_size: int | None,
        initial_state: LinearState | None,
        normalize: bool,
        eps: float,
        cu_seqlens: Packing | None = None,  # only for a backend with packs=True: B = 1, a state row per sequence
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]: ...


def prepare(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mode: str,
    chunk_size: int | None = None,
    initial_state: LinearState | tuple[Tensor, Tensor] | None = None,
    normalize: bool = True,
    eps: float = 1e-6,
    cu_seqlens: Packing | None = None,
) -> OpCall:
    """Validate a linear-attention call (see ``mixers.functional.linear_attention``); with ``cu_seqlens``
    (packed sequences in one row), the state has a row per sequence."""
    B, T, H, Dk, Dv = check_qkv(q, k, v)
    chunk = check_mode(mode, chunk_size)
    rows = B if cu_seqlens is None else cu_seqlens.n
    state = check_linear_state(initial_state, rows, H, Dk, Dv, q.dtype, q.device)
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__} {normalize!r}")
    eps = check_eps(eps)
    sd = state_dtype(q.dtype)
    return OpCall(
        args=(q, k, v),
        kwargs={
            "mode": mode,
            "chunk_size": chunk,
            "initial_state": state,
            "normalize": normalize,
            "eps": eps,
            **({} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}),
        },  # fmt: skip
        device=q.device,
        dtype=q.dtype,
        mode=mode,
        o=("o", (B, T, H, Dv), "[B, T, H, Dv]", q.dtype),
        state=[
            ("final_state.kv", (rows, H, Dk, Dv), "[B, H, Dk, Dv]", sd),
            ("final_state.z", (rows, H, Dk), "[B, H, Dk]", sd),
        ],
        describe=lambda: f"q {_shape(q)}, v {_shape(v)}",
        make_state=lambda state: LinearState(*state),
    )


def _local(arguments: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """What this rank's tokens add to the state (LASP-2): ``kv = sum_s k_s^T v_s``, ``z = sum_s k_s``."""
    q, k, v = arguments["q"], arguments["k"], arguments["v"]
    sd = state_dtype(q.dtype)
    ks = k.to(sd)
    return torch.einsum("bshk,bshv->bhkv", ks, v.to(sd)), ks.sum(1)


def _incoming(cp: Any, gathered: tuple[Tensor, ...], arguments: dict[str, Any]) -> dict[str, Any]:
    """The state after the earlier ranks: the sum of their contributions."""
    kvs, zs = gathered
    w = cp.earlier(kvs.device).to(kvs.dtype)
    state = LinearState(torch.einsum("jbhkv,j->bhkv", kvs, w), torch.einsum("jbhk,j->bhk", zs, w))
    return {**arguments, "initial_state": state}


LINEAR_ATTENTION = Op(
    "linear_attention",
    prepare,
    LinearAttentionBackend,
    state_type=LinearState,
    reference="mixers.ops.linear_attention.reference:linear_attention_reference",
    testing="mixers.ops.linear_attention.testing:SPEC",
    description="causal linear attention on feature-mapped q, k, with an optional guarded normaliser",
    context_parallel=ContextParallelForm(_local, _incoming),
)


@hookimpl
def register_ops(register) -> None:  # noqa: ANN001 - an OpRegistrar
    register(LINEAR_ATTENTION)
