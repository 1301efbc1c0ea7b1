"""Float64 references written straight from the formulas, independent of the library's code."""

from __future__ import annotations

import torch
from torch import Tensor


def retention_reference(
    q: Tensor, k: Tensor, v: Tensor, gamma: Tensor, initial_state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``o_t = sum_{s<=t} gamma^(t-s) (q_t . k_s) v_s + gamma^(t+1) q_t S_0`` and ``S_T``, in float64.

    Loops over (t, s) pairs with a plain power, the most literal reading of the formula.
    """
    q, k, v = q.double(), k.double(), v.double()
    g = gamma.double()
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    S0 = torch.zeros(B, H, Dk, Dv, dtype=torch.float64) if initial_state is None else initial_state.double()
    t = torch.arange(T, dtype=torch.float64)
    expo = t[:, None] - t[None, :]  # t - s
    decay = torch.where(expo >= 0, g[:, None, None] ** expo.clamp(min=0), torch.zeros(()).double())  # (H, T, T)
    scores = torch.einsum("bthd,bshd->bhts", q, k) * decay
    o = torch.einsum("bhts,bshe->bthe", scores, v)
    o = o + torch.einsum("bthd,bhde->bthe", q, S0) * (g[None, None, :, None] ** (t[None, :, None, None] + 1))
    final = S0 * g[None, :, None, None] ** T + torch.einsum(
        "bshd,bshe,hs->bhde", k, v, g[:, None] ** (T - 1 - t)[None, :]
    )
    return o, final
