"""Position rotation of queries and keys (RetNet's ``e^{i n theta}``, as in xPos/RoPE).

Rotating q at position n and k at position m by the same per-position angles makes ``q . k`` depend
on ``n - m`` only, which is what the paper's complex formulation ``Q_n e^{in theta} (K_m e^{im theta})^dagger``
says. Positions are absolute (``offset + t``) so that a state hand-over continues them.

The rotation is taken literally as a complex product: pairs of dimensions are viewed as complex numbers
and multiplied by ``e^{i pos theta}`` (one fused kernel forward and backward, and a constant such as
the key scaling folds into the same factor).
"""

from __future__ import annotations

import torch
from torch import Tensor

LAYOUTS = ("interleaved", "half")
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


def phases(theta: Tensor, offset: int, length: int) -> Tensor:
    """``e^{i pos theta}`` as complex128 ``[length, dim/2]`` for positions ``offset ... offset + length - 1``."""
    pos = torch.arange(offset, offset + length, dtype=torch.float64, device=theta.device)
    return torch.polar(torch.ones((), dtype=torch.float64, device=theta.device), pos[:, None] * theta[None, :])


def rotate_real(x: Tensor, cos: Tensor, sin: Tensor, *, layout: str) -> Tensor:
    """``rotate`` with the phase as its real and imaginary parts (broadcast to ``[..., D/2]``), in real
    arithmetic: what a compiled graph uses, as inductor generates no code for complex tensors."""
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    cos, sin = cos.to(work.dtype), sin.to(work.dtype)
    if layout == "interleaved":
        a, b = work.unflatten(-1, (-1, 2)).unbind(-1)
        return torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2).to(x.dtype)
    if layout == "half":
        a, b = work.chunk(2, dim=-1)
        return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1).to(x.dtype)
    raise ValueError(f"rotation layout must be one of {LAYOUTS}, got {layout!r}")


def rotate(x: Tensor, phase: Tensor, *, layout: str) -> Tensor:
    """Rotate pairs of dimensions of ``x [..., D]`` by the complex ``phase`` (broadcast to ``[..., D/2]``).

    ``(a, b) -> (a cos - b sin, b cos + a sin)`` times ``|phase|``. ``"interleaved"`` pairs dimensions
    2i and 2i + 1 (torchscale's layout); ``"half"`` pairs i with i + D/2 (GPT-NeoX/LLaMA layout).
    """
    if layout == "interleaved":
        work = x if x.dtype in (torch.float32, torch.float64) else x.float()  # there is no complex bfloat16
        if work.stride(-1) != 1 or any(s % 2 for s in work.stride()[:-1]):
            work = work.contiguous()  # a complex view needs pairs adjacent in memory
        pairs = torch.view_as_complex(work.unflatten(-1, (-1, 2)))
        return torch.view_as_real(pairs * phase.to(pairs.dtype)).flatten(-2).to(x.dtype)
    if layout == "half":
        cos = torch.cat([phase.real, phase.real], dim=-1).to(x.dtype)
        sin = torch.cat([phase.imag, phase.imag], dim=-1).to(x.dtype)
        a, b = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-b, a], dim=-1) * sin
    raise ValueError(f"rotation layout must be one of {LAYOUTS}, got {layout!r}")
