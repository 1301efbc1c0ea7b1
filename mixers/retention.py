"""Gated multi-scale retention (MSR, Sun et al. 2023, section 2.2) as the ``"retention"`` mixer.

``MSR(X) = (swish(X W_G) * GroupNorm_h(Retention_h(X))) W_O`` with per-head decays
``gamma = 1 - 2^(-5 - arange(H))``. Q and K are rotated by position (``mixers.rotary``) and K is
scaled by ``Dk^-0.5``; the op (``mixers/ops/retention``) does the rest.

Score normalisations. The paper also divides ``QK^T`` by ``sqrt(d)``, each row of ``D`` by the square
root of its sum, and the scores by ``max(|row sum|, 1)``, to keep fp16 activations in range. We apply
none of these beyond the ``Dk^-0.5`` key scaling: the per-head norm that follows is invariant to a
per-row scale, so they change nothing except through the norm's epsilon, and that epsilon is exactly
why the official code's parallel, chunkwise and recurrent modes disagree. Our op accumulates in
float32 whatever the input dtype, so it needs no rescaling for range, and all modes agree to rounding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch
from einops import rearrange
from torch import Tensor, nn

from mixers.catalogue import MixerRegistrar
from mixers.hookspecs import hookimpl
from mixers.interface import MixerState
from mixers.layers import HEAD_NORMS, HeadNorm, ProjectedMixer, Rotary, check_value_dim, resolve_heads
from mixers.ops.base import Op
from mixers.ops.checks import check_gamma, state_dtype
from mixers.ops.retention import RETENTION
from mixers.packing import Packing

__all__ = ["MultiScaleRetention", "default_gammas"]


DECAY_SCHEDULES = ("code", "paper")


def default_gammas(
    num_heads: int, *, decay: bool = True, multi_scale: bool = True, decay_schedule: str = "code"
) -> list[float]:
    """Per-head decays. ``decay_schedule="code"``: ``1 - 2^(-5 - h)``, what the official code and slides use;
    ``"paper"``: ``1 - exp(linspace(log 1/32, log 1/512, H))``, what the paper's experiments describe (the
    same first and, for H = 5, last head; a single head gets ``1 - 1/32``). Without multi-scale, one shared
    ``1 - 2^-5``; without decay, 1."""
    if decay_schedule not in DECAY_SCHEDULES:
        raise ValueError(f"decay_schedule must be one of {DECAY_SCHEDULES}, got {decay_schedule!r}")
    if not decay:
        return [1.0] * num_heads
    if not multi_scale:
        return [1.0 - 2.0**-5] * num_heads
    if decay_schedule == "paper":
        logs = torch.linspace(math.log(1 / 32), math.log(1 / 512), num_heads, dtype=torch.float64)
        return (1.0 - logs.exp()).tolist()
    return [1.0 - 2.0 ** (-5 - h) for h in range(num_heads)]


class MultiScaleRetention(ProjectedMixer):
    """Gated multi-scale retention; every component can be switched off for ablations.

    Arguments:
        d_model: model width.
        num_heads / head_dim: heads and their q/k width (give either; default: head dim 256 as in the
            paper, at most d_model).
        value_dim: total value (and gate) width; default ``2 * num_heads * head_dim`` as in the paper.
        gate: the swish output gate. group_norm: the per-head norm; ``norm`` picks ``"groupnorm"``
            (paper; LayerNorm per head) or ``"rmsnorm"`` (torchscale), ``norm_affine`` its weights.
        decay: ``False`` sets gamma = 1 (no decay). multi_scale: ``False`` shares one gamma.
            decay_schedule: ``"code"`` (``1 - 2^(-5 - h)``) or ``"paper"`` (``1 - exp(linspace(log 1/32,
            log 1/512, H))``); see ``default_gammas``. gammas: explicit per-head decays (overrides all three).
        rotary: rotate q, k by position; ``rope_layout`` ``"interleaved"`` (torchscale) or ``"half"``,
            ``rope_schedule`` ``"rope"``/``"linspace"`` (torchscale's), ``rope_base``.
        conv_size: taps of a short causal convolution (then SiLU) on q, k, v before retention, as fla's
            and Zoology's recurrent models have; ``None`` (default): none, the paper's layer.
        backend: the retention op's backend (``"auto"`` picks the best available).
        chunk_size: default chunk size for ``mode="chunkwise"``.

    The state's ``op`` is the retention state ``S [B, H, Dk, Dv]`` (float32, or float64 for float64 inputs);
    its ``conv``, with ``conv_size`` K, the last K-1 projected q, k, v inputs ``[B, K-1, 2 H Dk + H Dv]``.
    """

    ops = ("retention",)
    op: ClassVar[Op] = RETENTION  # what mix() calls, with decays(x)
    context_parallel = True  # runs split over ranks (mixers.context_parallel)
    op_state_type = Tensor

    def __init__(
        self,
        d_model: int,
        *,
        num_heads: int | None = None,
        head_dim: int | None = None,
        value_dim: int | None = None,
        gate: bool = True,
        group_norm: bool = True,
        norm: str = "groupnorm",
        norm_affine: bool = True,
        norm_eps: float = 1e-5,
        decay: bool = True,
        multi_scale: bool = True,
        decay_schedule: str = "code",
        gammas: Sequence[float] | None = None,
        rotary: bool = True,
        rope_layout: str = "interleaved",
        rope_schedule: str = "rope",
        rope_base: float = 10000.0,
        conv_size: int | None = None,
        backend: str = "auto",
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        H, Dk = resolve_heads(d_model, num_heads, head_dim, default_head_dim=min(256, d_model))
        value_dim = check_value_dim(2 * H * Dk if value_dim is None else value_dim, H)
        if norm not in HEAD_NORMS:
            raise ValueError(f"norm must be one of {HEAD_NORMS}, got {norm!r}")
        self.num_heads, self.head_dim, self.value_head_dim = H, Dk, value_dim // H
        self.group_norm, self.norm = group_norm, norm
        self.scaling = Dk**-0.5
        self._scales: dict[tuple[torch.device, bool], Tensor] = {}
        # Decays travel to the op as Python floats (checked without a device sync, never rounded by .to()).
        if gammas is None:
            gammas = default_gammas(H, decay=decay, multi_scale=multi_scale, decay_schedule=decay_schedule)
        self.gammas = tuple(check_gamma(gammas, H, torch.device("cpu")).tolist())
        self.rope = Rotary(Dk, layout=rope_layout, schedule=rope_schedule, base=rope_base) if rotary else None
        head_norm = HeadNorm(H, value_dim // H, norm, affine=norm_affine, eps=norm_eps) if group_norm else None
        self.init_frame(
            d_model, [H * Dk, H * Dk, value_dim], value_dim, gate=gate, head_norm=head_norm, conv_size=conv_size,
            backend=backend, chunk_size=chunk_size,
        )  # fmt: skip
        self.reset_parameters()

    def _qk_scales(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        """``[1, Dk^-0.5]`` as ``[2, 1, 1]``, folded into the rotation of ``(q, k)``; made once per device."""
        key = (device, dtype == torch.float64)
        scales = self._scales.get(key)
        if scales is None:
            real = torch.float64 if dtype == torch.float64 else torch.float32
            scales = self._scales[key] = torch.tensor([1.0, self.scaling], dtype=real, device=device)[:, None, None]
        return scales

    def reset_parameters(self) -> None:
        # Small input projections (as in the official code) keep early retention outputs tame.
        for block in self.in_proj.weight.split(self.widths, dim=0):
            nn.init.xavier_uniform_(block, gain=2**-2.5)
        nn.init.xavier_uniform_(self.out_proj.weight)

    def init_state(
        self,
        batch_size: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        max_len: int | None = None,  # the state has a fixed size: nothing to preallocate
    ) -> MixerState:
        shape = (batch_size, self.num_heads, self.head_dim, self.value_head_dim)
        kv = torch.zeros(shape, device=device, dtype=state_dtype(dtype))
        conv = None if self.conv is None else self.conv.init_window(batch_size, device=device, dtype=dtype)
        return MixerState.start(kv, batch_size, device=device, conv=conv)

    def mix(
        self, x: Tensor, state: MixerState | None, cu_seqlens: Packing | None, mode: str, chunk_size: int | None
    ) -> tuple[Tensor, MixerState]:
        B, T = x.shape[:2]
        H, Dk, Dv = self.num_heads, self.head_dim, self.value_head_dim
        qkv, g, window = self.project(x, state, cu_seqlens)
        qk, v = qkv.split([2 * H * Dk, self.widths[2]], dim=-1)
        qk = rearrange(qk, "b t (two h d) -> b t two h d", two=2, h=H)  # q and k, rotated and scaled in one pass
        if self.rope is not None:
            qk = self.rope(qk, self.positions(state, cu_seqlens), self._qk_scales(x.device, x.dtype))
        else:
            qk = qk * qk.new_tensor([1.0, self.scaling])[:, None, None]
        q, k = qk.unbind(2)
        o, kv = self.run_op(
            self.op,
            q,
            k,
            v.view(B, T, H, Dv),
            self.decays(x),
            mode=mode,
            chunk_size=chunk_size,
            initial_state=None if state is None else state.op,
            backend=self.backend,
            cu_seqlens=cu_seqlens,
        )  # (B, T, H, Dv)
        return self.output(o, g), self.next_state(state, x, kv, cu_seqlens, conv=window)

    def decays(self, x: Tensor) -> Sequence[float] | Tensor:
        """The op's decay argument for the tokens ``x``: the fixed per-head ``gammas`` (a subclass with decays that
        depend on the token returns them instead, for its ``op``)."""
        return self.gammas

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
            f"value_head_dim={self.value_head_dim}, gate={self.gate}, group_norm={self.group_norm}, "
            f"gammas={[round(g, 6) for g in self.gammas]}, {self.frame_repr()}"
        )


@hookimpl
def register_mixers(register: MixerRegistrar) -> None:
    register(
        "retention",
        MultiScaleRetention,
        ops=("retention",),
        description="gated multi-scale retention (RetNet)",
    )
