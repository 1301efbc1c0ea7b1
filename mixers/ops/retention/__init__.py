"""The ``retention`` op: ``o_t = sum_{s<=t} gamma^(t-s) (q_t . k_s) v_s + gamma^(t+1) q_t S_0``.

Its state is ``S [B, H, Dk, Dv]`` (float32; float64 for float64 inputs). Its float64 reference is in
``reference.py``, its conformance spec (hypothesis cases) in ``testing.py``; its backends are registered
through ``register_backends`` (the torch one in ``mixers/backends/torch_retention.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from torch import Tensor

from mixers.ops.base import Op, OpCall
from mixers.ops.checks import _shape, check_gamma, check_mode, check_qkv, check_state, state_dtype


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
) -> OpCall:
    """Validate a retention call (see ``mixers.functional.retention``)."""
    B, T, H, Dk, Dv = check_qkv(q, k, v)
    chunk = check_mode(mode, chunk_size)
    g = check_gamma(gamma, H, q.device)
    sd = state_dtype(q.dtype)
    check_state(initial_state, "initial_state", (B, H, Dk, Dv), sd, q.device)
    return OpCall(
        args=(q, k, v, g),
        kwargs={"mode": mode, "chunk_size": chunk, "initial_state": initial_state},
        device=q.device,
        dtype=q.dtype,
        mode=mode,
        o=("o", (B, T, H, Dv), "[B, T, H, Dv]", q.dtype),
        state=[("final_state", (B, H, Dk, Dv), "[B, H, Dk, Dv]", sd)],
        describe=lambda: f"q {_shape(q)}, v {_shape(v)}",
    )


RETENTION = Op(
    "retention",
    prepare,
    RetentionBackend,
    state_type=Tensor,
    reference="mixers.ops.retention.reference:retention_reference",
    testing="mixers.ops.retention.testing:SPEC",
    description="retention (RetNet): decayed causal linear attention, parallel / chunkwise / recurrent",
)
