"""Gated retention (YOCO, Sun et al. 2024, section 2.2) as the ``"gated_retention"`` mixer.

The multi-scale retention frame (``mixers.retention``: rotary q and k, key scaling, per-head norm, swish output
gate, optional short convolution, output projection) with a data-dependent decay: a projection ``W_gamma`` of the
layer's input gives each token and head ``gamma_t = sigmoid(x_t W_gamma + b)^(1/tau)``, that is the log decay
``g_t = logsigmoid(x_t W_gamma + b) / tau`` the op (``mixers/ops/gated_retention``) takes; ``tau = 16`` as in YOCO.

Initialisation. ``W_gamma`` starts at zero and the bias ``b_h = logit(gamma_h^tau)``, so that at initialisation
every token of head h decays by exactly the paper's fixed ``gamma_h = 1 - 2^(-5-h)``: the layer starts as the
RetNet layer it generalises (same decays, same function) and learns from there how the decay should depend on the
input. (YOCO's own code leaves the projection at PyTorch's default initialisation, which puts every head's decay
near ``0.5^(1/16) = 0.958``: one scale for all heads, none of the long-memory ones.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixers.catalogue import MixerRegistrar
from mixers.hookspecs import hookimpl
from mixers.ops.gated_retention import GATED_RETENTION
from mixers.retention import MultiScaleRetention

__all__ = ["GatedRetention"]


class GatedRetention(MultiScaleRetention):
    """Gated retention: multi-scale retention whose decays depend on the token.

    Arguments:
        d_model, num_heads, head_dim, value_dim, gate, group_norm, norm, norm_affine, norm_eps, rotary,
            rope_layout, rope_schedule, rope_base, conv_size, backend, chunk_size: as for
            ``mixers.retention.MultiScaleRetention``.
        tau: the decay's temperature: ``g = logsigmoid(x W_gamma + b) / tau`` (YOCO: 16). A larger tau keeps
            the decays nearer 1 for the same projection.
        gammas: the per-head decays at initialisation (default the paper's ``1 - 2^(-5-h)``), each in (0, 1).

    The state is the op's ``S [B, H, Dk, Dv]`` (float32, or float64 for float64 inputs) and, with ``conv_size``,
    the convolution's window, as for ``MultiScaleRetention``.
    """

    ops = ("gated_retention",)
    op = GATED_RETENTION  # called by MultiScaleRetention.mix with decays(x)

    def __init__(
        self,
        d_model: int,
        *,
        tau: float = 16.0,
        gammas: Sequence[float] | None = None,
        num_heads: int | None = None,
        head_dim: int | None = None,
        value_dim: int | None = None,
        gate: bool = True,
        group_norm: bool = True,
        norm: str = "groupnorm",
        norm_affine: bool = True,
        norm_eps: float = 1e-5,
        rotary: bool = True,
        rope_layout: str = "interleaved",
        rope_schedule: str = "rope",
        rope_base: float = 10000.0,
        conv_size: int | None = None,
        backend: str = "auto",
        chunk_size: int | None = None,
    ) -> None:
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau > 0:
            raise ValueError(f"tau must be a positive number (YOCO uses 16), got {tau!r}")
        super().__init__(
            d_model, num_heads=num_heads, head_dim=head_dim, value_dim=value_dim, gate=gate, group_norm=group_norm,
            norm=norm, norm_affine=norm_affine, norm_eps=norm_eps, gammas=gammas, rotary=rotary,
            rope_layout=rope_layout, rope_schedule=rope_schedule, rope_base=rope_base, conv_size=conv_size,
            backend=backend, chunk_size=chunk_size,
        )  # fmt: skip
        if any(g >= 1 for g in self.gammas):
            raise ValueError(
                f"gammas (the initial decays) must lie in (0, 1): a decay of 1 would need an infinite bias, got "
                f"{list(self.gammas)}"
            )
        self.tau = float(tau)
        self.decay_proj = nn.Linear(d_model, self.num_heads)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The frame's init, then ``W_gamma = 0`` and ``b_h = logit(gamma_h^tau)``: every token's decay is
        ``gamma_h`` (module docstring). (``MultiScaleRetention``'s constructor calls this before the decay
        projection exists.)"""
        super().reset_parameters()
        if not hasattr(self, "decay_proj"):
            return
        target = torch.tensor(self.gammas, dtype=torch.float64) ** self.tau
        with torch.no_grad():
            self.decay_proj.weight.zero_()
            self.decay_proj.bias.copy_(torch.logit(target))

    def decays(self, x: Tensor) -> Tensor:
        """The log decays ``g [B, T, H]`` of the tokens of ``x [B, T, d_model]``, in float32 at least, the bias
        added in its own precision after the product (which autocast may run in bfloat16): a long-memory head's
        decay is ``1 - 2^-12``, and its log is lost when the bias ``logit(gamma^tau) = 5.5`` is rounded to
        bfloat16."""
        real = torch.promote_types(x.dtype, torch.float32)
        logits = F.linear(x, self.decay_proj.weight).to(real) + self.decay_proj.bias.to(real)
        return F.logsigmoid(logits) / self.tau

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, tau={self.tau}"


@hookimpl
def register_mixers(register: MixerRegistrar) -> None:
    register(
        "gated_retention",
        GatedRetention,
        ops=("gated_retention",),
        description="gated retention (YOCO): multi-scale retention with data-dependent decays",
    )
