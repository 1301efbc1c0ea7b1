"""Float64 references written straight from the formulas, independent of the library's code.

Each returns ``(o, state)`` with the state as the op returns it (a tensor, a ``LinearState`` or a
``KVCache``), in float64, so a backend's results can be compared field by field.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mixers.functional import KVCache, LinearState


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


def softmax_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, initial_state: KVCache | tuple[Tensor, Tensor] | None = None
) -> tuple[Tensor, KVCache]:
    """``o_t = sum_{s<=Tc+t} exp(q_t . k_s / sqrt(d)) v_s / sum_{s<=Tc+t} exp(q_t . k_s / sqrt(d))``, float64.

    A loop over query tokens and heads, straight from the formula (no max subtraction: keep inputs
    moderate). Query head h reads key head ``h // (H / Hkv)``; the cache holds the keys before ``q``'s.
    """
    q, k, v = q.double(), k.double(), v.double()
    if initial_state is not None:
        k = torch.cat([initial_state[0].double(), k], dim=1)
        v = torch.cat([initial_state[1].double(), v], dim=1)
    B, T, H, D = q.shape
    Tc, G = k.shape[1] - T, H // k.shape[2]
    o = q.new_zeros(B, T, H, v.shape[-1])
    for t in range(T):
        for h in range(H):
            w = torch.exp(torch.einsum("bd,bsd->bs", q[:, t, h], k[:, : Tc + t + 1, h // G]) / math.sqrt(D))
            o[:, t, h] = torch.einsum("bs,bse->be", w, v[:, : Tc + t + 1, h // G]) / w.sum(-1, keepdim=True)
    return o, KVCache(k, v)


def short_conv_reference(x: Tensor, weight: Tensor, window: Tensor | None = None) -> Tensor:
    """``y_t[c] = silu(sum_j weight[c, j] * x_{t-K+1+j}[c])`` in float64, one tap at a time, over ``x [B, T, C]``
    preceded by ``window [B, K-1, C]`` (zeros if ``None``): the mixers' short convolution on q, k, v."""
    x, weight = x.double(), weight.double()
    B, T, C = x.shape
    K = weight.shape[1]
    past = torch.zeros(B, K - 1, C, dtype=torch.float64) if window is None else window.double()
    padded = torch.cat([past, x], dim=1)  # padded[:, t + K - 1] is x_t
    y = torch.zeros(B, T, C, dtype=torch.float64)
    for j in range(K):  # tap j multiplies x_{t-K+1+j}, i.e. padded[:, t + j]
        y += weight[:, j] * padded[:, j : j + T]
    return torch.nn.functional.silu(y)
