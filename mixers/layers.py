"""Small parameterised pieces that several mixers share."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

HEAD_NORMS = ("groupnorm", "rmsnorm")


class HeadNorm(nn.Module):
    """A norm over each head's ``Dv`` values: ``[B, T, H, Dv]`` in, the same shape and memory layout out.

    ``"groupnorm"`` is GroupNorm with H groups (the paper's), i.e. LayerNorm over each head's values with
    per-channel affine weights; ``"rmsnorm"`` is RMSNorm per head (torchscale's). The layout is kept so that
    a following elementwise op (the gate) does any transpose in passing instead of a copy here.
    The affine weights are stored flat, ``[H * Dv]``, as they act on the concatenated heads.
    """

    def __init__(
        self, num_heads: int, head_dim: int, kind: str = "groupnorm", *, affine: bool = True, eps: float = 1e-5
    ) -> None:
        super().__init__()
        if kind not in HEAD_NORMS:
            raise ValueError(f"norm must be one of {HEAD_NORMS}, got {kind!r}")
        self.num_heads, self.head_dim, self.kind, self.eps = num_heads, head_dim, kind, eps
        width = num_heads * head_dim
        self.weight = nn.Parameter(torch.ones(width)) if affine else None
        self.bias = nn.Parameter(torch.zeros(width)) if affine and kind == "groupnorm" else None

    def forward(self, o: Tensor) -> Tensor:
        shape = (self.num_heads, self.head_dim)
        if self.kind == "groupnorm":
            y = F.layer_norm(o, shape[-1:], None, None, self.eps)
            return y if self.weight is None else torch.addcmul(self.bias.view(shape), y, self.weight.view(shape))
        y = F.rms_norm(o, shape[-1:], None, self.eps)  # its own weight could only be (Dv,); ours is per head
        return y if self.weight is None else y * self.weight.view(shape)

    def extra_repr(self) -> str:
        return f"{self.kind}, heads={self.num_heads}, head_dim={self.head_dim}, eps={self.eps}"
