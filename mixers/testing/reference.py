"""Float64 references written straight from the formulas, independent of the library's code.

Each op's reference lives in its folder (``mixers/ops/<op>/reference.py``) and is re-exported here; this
module adds the references of the mixers' own pieces (the short convolution). Each takes inputs of any float
dtype and returns the output and the final state as the op returns them, in float64:

- ``retention_reference(q, k, v, gamma, initial_state=None) -> (o, S_T)``;
- ``linear_attention_reference(q, k, v, initial_state=None, *, normalize=True, eps=1e-6) -> (o, LinearState)``;
- ``softmax_attention_reference(q, k, v, initial_state=None) -> (o, KVCache)``, the cache as ``KVCache.held()``
  gives it;
- ``short_conv_reference(x, weight, window=None) -> y``.

docs/testing-api.md documents them, with an example test.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mixers.ops.linear_attention.reference import linear_attention_reference
from mixers.ops.retention.reference import retention_reference
from mixers.ops.softmax_attention.reference import softmax_attention_reference

__all__ = ["linear_attention_reference", "retention_reference", "short_conv_reference", "softmax_attention_reference"]


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
