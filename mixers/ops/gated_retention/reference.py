"""The float64 reference of the op, written straight from the formula, independent of the library's code.

It returns ``(o, state)`` in float64, so a backend's results can be compared field by field.
"""

from __future__ import annotations

import torch
from torch import Tensor


def gated_retention_reference(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, initial_state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``o_t = sum_{s<=t} exp(sum_{s<u<=t} g_u) (q_t . k_s) v_s + exp(sum_{u<=t} g_u) q_t S_0`` and ``S_T``.

    Every decay is its own sum over the tokens between (a ``[T, T, T]`` mask), the most literal reading of the
    formula; a -inf log decay gives a factor 0 (the sums are masked with ``where``, never multiplied by 0).
    """
    q, k, v, g = q.double(), k.double(), v.double(), g.double()
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    S0 = q.new_zeros(B, H, Dk, Dv) if initial_state is None else initial_state.double()
    t = torch.arange(T, device=q.device)
    # between[t, s, u]: s < u <= t. The decay from s to t sums g over those u.
    between = (t[None, :, None] < t[None, None, :]) & (t[None, None, :] <= t[:, None, None])
    gu = g.permute(0, 2, 1)[:, :, None, None, :]  # [B, H, 1, 1, u]
    logs = torch.where(between, gu, gu.new_zeros(())).sum(-1)  # [B, H, t, s]
    decay = torch.where(t[:, None] >= t[None, :], logs.exp(), logs.new_zeros(()))
    scores = torch.einsum("bthd,bshd->bhts", q, k) * decay
    o = torch.einsum("bhts,bshe->bthe", scores, v)
    upto = torch.where(t[None, :] <= t[:, None], g.permute(0, 2, 1)[:, :, None, :], g.new_zeros(())).sum(-1)  # [B,H,t]
    o = o + torch.einsum("bthd,bhde->bthe", q, S0) * upto.exp().permute(0, 2, 1)[..., None]
    after = torch.where(t[None, :] > t[:, None], g.permute(0, 2, 1)[:, :, None, :], g.new_zeros(())).sum(-1)  # u > s
    total = g.sum(1)  # [B, H]
    final = S0 * total.exp()[..., None, None] + torch.einsum("bshd,bshe,bhs->bhde", k, v, after.exp())
    return o, final
