"""The float64 reference of the op, written straight from the formula, independent of the library's code.

It returns ``(o, state)`` with the state as the op returns it, in float64, so a backend's results can be
compared field by field.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mixers.ops.softmax_attention import KVCache


def softmax_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, initial_state: KVCache | tuple[Tensor, Tensor] | None = None
) -> tuple[Tensor, KVCache]:
    """``o_t = sum_{s<=Tc+t} exp(q_t . k_s / sqrt(d)) v_s / sum_{s<=Tc+t} exp(q_t . k_s / sqrt(d))``, float64.

    A loop over rows, query tokens and heads, straight from the formula (no max subtraction: keep inputs
    moderate). Query head h reads key head ``h // (H / Hkv)``; row b's cache holds ``length[b]`` keys before
    ``q``'s (all of them for a pair ``(k, v)``), head-major (``[B, Hkv, C, D]``). Returns the cache as
    ``KVCache.held`` gives it: each row's keys, then zeros up to the longest row.
    """
    q, k, v = q.double(), k.double(), v.double()
    B, T, H, D = q.shape
    G = H // k.shape[2]
    if initial_state is None:
        lengths = [0] * B
        past_k, past_v = k[:, :0], v[:, :0]
    else:
        # token-major, to be joined with the new keys
        past_k, past_v = initial_state[0].double().transpose(1, 2), initial_state[1].double().transpose(1, 2)
        held = initial_state[2] if len(initial_state) == 3 and initial_state[2] is not None else None
        lengths = [past_k.shape[1]] * B if held is None else [int(n) for n in held]
    rows_k = [torch.cat([past_k[b, : lengths[b]], k[b]]) for b in range(B)]
    rows_v = [torch.cat([past_v[b, : lengths[b]], v[b]]) for b in range(B)]
    o = q.new_zeros(B, T, H, v.shape[-1])
    for b in range(B):
        for t in range(T):
            n = lengths[b] + t + 1  # the row's cache and the new tokens up to t
            for h in range(H):
                w = torch.exp(rows_k[b][:n, h // G] @ q[b, t, h] / math.sqrt(D))
                o[b, t, h] = w @ rows_v[b][:n, h // G] / w.sum()
    longest = max(lengths, default=0) + T

    def padded(rows: list[Tensor]) -> Tensor:
        return torch.stack([torch.cat([r, r.new_zeros(longest - r.shape[0], *r.shape[1:])]) for r in rows])

    if B == 0:
        return o, KVCache(k.transpose(1, 2), v.transpose(1, 2), torch.zeros(0, dtype=torch.int64))
    length = torch.tensor([n + T for n in lengths], dtype=torch.int64)
    return o, KVCache(padded(rows_k).transpose(1, 2), padded(rows_v).transpose(1, 2), length)
