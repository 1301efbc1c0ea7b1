"""The float64 reference of the op, written straight from the formula, independent of the library's code.

It returns ``(o, state)`` with the state as the op returns it, in float64, so a backend's results can be
compared field by field.
"""

from __future__ import annotations

import torch
from torch import Tensor


def retention_reference(
    q: Tensor, k: Tensor, v: Tensor, gamma: Tensor, initial_state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``o_t = sum_{s<=t} gamma^(t-s) (q_t . k_s) v_s + gamma^(t+1) q_t S_0`` and ``S_T``, in float64.

    Takes a plain power for every (t, s) pair, the most literal reading of the formula.
    """
    q, k, v = q.double(), k.double(), v.double()
    g = torch.as_tensor(gamma, dtype=torch.float64).to(q.device)
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    S0 = q.new_zeros(B, H, Dk, Dv) if initial_state is None else initial_state.double()
    t = torch.arange(T, dtype=torch.float64, device=q.device)
    expo = t[:, None] - t[None, :]  # t - s
    decay = torch.where(expo >= 0, g[:, None, None] ** expo.clamp(min=0), q.new_zeros(()))  # (H, T, T)
    scores = torch.einsum("bthd,bshd->bhts", q, k) * decay
    o = torch.einsum("bhts,bshe->bthe", scores, v)
    o = o + torch.einsum("bthd,bhde->bthe", q, S0) * (g[None, None, :, None] ** (t[None, :, None, None] + 1))
    final = S0 * g[None, :, None, None] ** T + torch.einsum(
        "bshd,bshe,hs->bhde", k, v, g[:, None] ** (T - 1 - t)[None, :]
    )
    return o, final
