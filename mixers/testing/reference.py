"""Float64 references of the mixers' own pieces (the short convolution), written straight from the formulas.

Each op's reference lives in its folder, ``mixers/ops/<op>/reference.py`` (``Op.reference`` names it): e.g.
``mixers.ops.retention.reference.retention_reference``. docs/testing-api.md documents them, with an example test.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["short_conv_reference"]


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
