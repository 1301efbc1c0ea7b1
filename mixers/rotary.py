"""Position rotation of queries and keys (RetNet's ``e^{i n theta}``, as in xPos/RoPE).

Rotating q at position n and k at position m by the same per-position angles makes ``q . k`` depend
on ``n - m`` only, which is what the paper's complex formulation ``Q_n e^{in theta} (K_m e^{im theta})^dagger``
says. Positions are absolute (``offset + t``) so that a state hand-over continues them.
"""

from __future__ import annotations

import torch
from torch import Tensor

LAYOUTS = ("half", "interleaved")
SCHEDULES = ("rope", "linspace")


def angles(dim: int, *, schedule: str = "rope", base: float = 10000.0) -> Tensor:
    """The ``dim // 2`` rotation frequencies (float64).

    ``"rope"``: ``base^(-2i/dim)`` (RoFormer/xPos). ``"linspace"``: ``base^(-linspace(0, 1, dim/2))``,
    the schedule of the official RetNet code (torchscale).
    """
    if dim % 2:
        raise ValueError(f"rotation needs an even head dimension, got {dim}")
    if schedule == "rope":
        exponent = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    elif schedule == "linspace":
        exponent = torch.linspace(0, 1, dim // 2, dtype=torch.float64)
    else:
        raise ValueError(f"rotation schedule must be one of {SCHEDULES}, got {schedule!r}")
    return base**-exponent


def cos_sin(theta: Tensor, offset: int, length: int, *, layout: str, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``cos`` and ``sin`` tables ``[length, 1, dim]`` for positions ``offset ... offset + length - 1``."""
    pos = torch.arange(offset, offset + length, dtype=torch.float64, device=theta.device)
    phase = pos[:, None] * theta[None, :]  # (T, dim/2)
    if layout == "half":
        phase = torch.cat([phase, phase], dim=-1)
    elif layout == "interleaved":
        phase = phase.repeat_interleave(2, dim=-1)
    else:
        raise ValueError(f"rotation layout must be one of {LAYOUTS}, got {layout!r}")
    return phase.cos()[:, None].to(dtype), phase.sin()[:, None].to(dtype)


def rotate(x: Tensor, cos: Tensor, sin: Tensor, *, layout: str) -> Tensor:
    """Rotate pairs of dimensions of ``x [B, T, H, D]``: ``(a, b) -> (a cos - b sin, b cos + a sin)``.

    ``"half"`` pairs dimension i with i + D/2; ``"interleaved"`` pairs 2i with 2i + 1 (torchscale).
    """
    if layout == "half":
        a, b = x.chunk(2, dim=-1)
        turned = torch.cat([-b, a], dim=-1)
    else:
        a, b = x[..., 0::2], x[..., 1::2]
        turned = torch.stack([-b, a], dim=-1).flatten(-2)
    return x * cos + turned * sin
