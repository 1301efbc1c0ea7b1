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


class ShortConv(nn.Module):
    """A short causal depthwise convolution over ``[B, T, C]``, then SiLU, with its window handed over.

    ``y_t[c] = silu(sum_{j<K} weight[c, j] * x_{t-K+1+j}[c])``: each channel mixes its own last K inputs.
    Recurrent mixers use it on q, k and v (as fla's and Zoology's strong recurrent models do): a key then
    carries its neighbours, which is what associative recall needs and a decaying sum alone is slow to learn.
    The convolution has no accumulated state, only the last ``K-1`` inputs (oldest first), so every mode
    computes it the same way and a split with the window handed over equals one pass exactly.
    """

    def __init__(self, channels: int, kernel_size: int) -> None:
        super().__init__()
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1:
            raise ValueError(f"conv_size must be a positive int (taps of the short convolution), got {kernel_size!r}")
        self.channels, self.kernel_size = channels, kernel_size
        self.weight = nn.Parameter(torch.empty(channels, kernel_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = self.kernel_size**-0.5  # nn.Conv1d's default for a depthwise kernel
        nn.init.uniform_(self.weight, -bound, bound)

    def init_window(self, batch_size: int, *, device: torch.device | str | None = None, dtype: torch.dtype) -> Tensor:
        return torch.zeros(batch_size, self.kernel_size - 1, self.channels, device=device, dtype=dtype)

    def forward(self, x: Tensor, window: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``x [B, T, C]`` after ``window [B, K-1, C]`` (``None``: zeros); return ``(y, new window)``."""
        B, _, C = x.shape
        want = (B, self.kernel_size - 1, C)
        if window is None:
            window = self.init_window(B, device=x.device, dtype=x.dtype)
        elif not isinstance(window, Tensor) or tuple(window.shape) != want:
            got = list(window.shape) if isinstance(window, Tensor) else type(window).__name__
            raise ValueError(f"the state's conv window must be [B, conv_size - 1, channels] = {list(want)}, got {got}")
        window = window.to(x.dtype)
        if x.shape[1] == 0:  # nothing to convolve (conv1d refuses an input shorter than the kernel)
            return x, window
        xx = torch.cat([window, x], dim=1)  # (B, K-1+T, C)
        # K shifted products: on CPU about twice as fast as a grouped conv1d, forward and backward.
        T, w = x.shape[1], self.weight.to(x.dtype)
        y = xx[:, :T] * w[:, 0]
        for j in range(1, self.kernel_size):
            y = y + xx[:, j : j + T] * w[:, j]
        return F.silu(y), xx[:, xx.shape[1] - (self.kernel_size - 1) :].clone()  # not a view pinning all of xx

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kernel_size={self.kernel_size}"


def conv_window(conv: ShortConv | None, state: object | None) -> Tensor | None:
    """The window a mixer's ``state.conv`` hands to its ``conv`` (``None`` before any token).

    A state from a mixer with a different ``conv_size`` (or none) is refused: reading it as zeros would
    silently compute something else.
    """
    window = None if state is None else state.conv
    if state is not None and (conv is None) != (window is None):
        have = "no short convolution" if conv is None else f"conv_size={conv.kernel_size}"
        held = "a conv window" if window is not None else "no conv window"
        raise ValueError(f"the state holds {held}, but this mixer has {have}: was it made by another mixer's settings?")
    return window
