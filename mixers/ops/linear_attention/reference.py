"""The float64 reference of the op, written straight from the formula, independent of the library's code.

It returns ``(o, state)`` with the state as the op returns it, in float64, so a backend's results can be
compared field by field.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mixers.ops.linear_attention import LinearState


def linear_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    initial_state: LinearState | tuple[Tensor, Tensor] | None = None,
    *,
    normalize: bool = True,
    eps: float = 1e-6,
) -> tuple[Tensor, LinearState]:
    """``o_t = (q_t kv_0 + sum_{s<=t} (q_t . k_s) v_s) / guard(q_t . (z_0 + sum_{s<=t} k_s))`` in float64.

    The guard as documented: ``d`` if ``|d| >= eps``, else ``eps`` for ``d >= 0`` and ``-eps`` for ``d < 0``;
    no division without ``normalize``. Each output sums its own prefix directly, with no recurrence.
    """
    q, k, v = q.double(), k.double(), v.double()
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    if initial_state is None:
        kv0, z0 = q.new_zeros(B, H, Dk, Dv), q.new_zeros(B, H, Dk)
    else:
        kv0, z0 = initial_state[0].double(), initial_state[1].double()
    outs = []
    for t in range(T):
        scores = torch.einsum("bhd,bshd->bhs", q[:, t], k[:, : t + 1])  # q_t . k_s for s <= t
        num = torch.einsum("bhs,bshe->bhe", scores, v[:, : t + 1]) + torch.einsum("bhd,bhde->bhe", q[:, t], kv0)
        if normalize:
            den = scores.sum(-1) + torch.einsum("bhd,bhd->bh", q[:, t], z0)
            fallback = torch.where(den >= 0, torch.full_like(den, eps), torch.full_like(den, -eps))
            num = num / torch.where(den.abs() >= eps, den, fallback)[..., None]
        outs.append(num)
    o = torch.stack(outs, dim=1) if outs else q.new_zeros(B, 0, H, Dv)
    return o, LinearState(kv0 + torch.einsum("bshd,bshe->bhde", k, v), z0 + k.sum(1))
