"""Gated multi-scale retention (MSR, Sun et al. 2023, section 2.2) as the ``"retention"`` mixer.

``MSR(X) = (swish(X W_G) * GroupNorm_h(Retention_h(X))) W_O`` with per-head decays
``gamma = 1 - 2^(-5 - arange(H))``. Q and K are rotated by position (``mixers.rotary``) and K is
scaled by ``Dk^-0.5``; the op ``mixers.functional.retention`` does the rest.

Score normalisations. The paper also divides ``QK^T`` by ``sqrt(d)``, each row of ``D`` by the square
root of its sum, and the scores by ``max(|row sum|, 1)``, to keep fp16 activations in range. We apply
none of these beyond the ``Dk^-0.5`` key scaling: the per-head norm that follows is invariant to a
per-row scale, so they change nothing except through the norm's epsilon, and that epsilon is exactly
why the official code's parallel, chunkwise and recurrent modes disagree. Our op accumulates in
float32 whatever the input dtype, so it needs no rescaling for range, and all modes agree to rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixers import functional
from mixers import rotary as rope
from mixers.hookspecs import hookimpl
from mixers.interface import MixerState, TokenMixer
from mixers.layers import HEAD_NORMS, HeadNorm, ShortConv, conv_window
from mixers.registry import MixerRegistrar


@dataclass
class RetentionState(MixerState):
    """``kv``: the retention state ``S [B, H, Dk, Dv]`` (float32, or float64 for float64 inputs); ``conv``:
    with ``conv_size`` K, the last K-1 projected q, k, v inputs ``[B, K-1, 2 H Dk + H Dv]`` (input dtype)."""

    kv: Tensor
    conv: Tensor | None = None


def resolve_heads(d_model: int, num_heads: int | None, head_dim: int | None, default_head_dim: int) -> tuple[int, int]:
    """``(num_heads, head_dim)`` from whichever of the two is given (the other must divide d_model)."""
    for name, value in (("d_model", d_model), ("num_heads", num_heads), ("head_dim", head_dim)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if num_heads is None and head_dim is None:
        num_heads = max(1, d_model // default_head_dim)
    if head_dim is None:
        if d_model % num_heads:
            raise ValueError(
                f"d_model={d_model} is not divisible by num_heads={num_heads}; pick a divisor or set head_dim"
            )
        head_dim = d_model // num_heads
    if num_heads is None:
        if d_model % head_dim:
            raise ValueError(
                f"d_model={d_model} is not divisible by head_dim={head_dim}; pick a divisor or set num_heads"
            )
        num_heads = d_model // head_dim
    return num_heads, head_dim


def check_value_dim(value_dim: int, num_heads: int) -> int:
    """``value_dim`` (the total value width) if it splits evenly over the heads."""
    if isinstance(value_dim, bool) or not isinstance(value_dim, int) or value_dim < 1 or value_dim % num_heads:
        raise ValueError(f"value_dim must be a positive multiple of num_heads={num_heads}, got {value_dim!r}")
    return value_dim


def default_gammas(num_heads: int, *, decay: bool = True, multi_scale: bool = True) -> list[float]:
    """The paper's decays ``1 - 2^(-5 - h)``; one shared ``1 - 2^-5`` without multi-scale; 1 without decay."""
    if not decay:
        return [1.0] * num_heads
    if not multi_scale:
        return [1.0 - 2.0**-5] * num_heads
    return [1.0 - 2.0 ** (-5 - h) for h in range(num_heads)]


class MultiScaleRetention(TokenMixer):
    """Gated multi-scale retention; every component can be switched off for ablations.

    Arguments:
        d_model: model width.
        num_heads / head_dim: heads and their q/k width (give either; default: head dim 256 as in the
            paper, at most d_model).
        value_dim: total value (and gate) width; default ``2 * num_heads * head_dim`` as in the paper.
        gate: the swish output gate. group_norm: the per-head norm; ``norm`` picks ``"groupnorm"``
            (paper; LayerNorm per head) or ``"rmsnorm"`` (torchscale), ``norm_affine`` its weights.
        decay: ``False`` sets gamma = 1 (no decay). multi_scale: ``False`` shares one gamma.
            gammas: explicit per-head decays (overrides both).
        rotary: rotate q, k by position; ``rope_layout`` ``"interleaved"`` (torchscale) or ``"half"``,
            ``rope_schedule`` ``"rope"``/``"linspace"`` (torchscale's), ``rope_base``.
        conv_size: taps of a short causal convolution (then SiLU) on q, k, v before retention, as fla's
            and Zoology's recurrent models have; ``None`` (default): none, the paper's layer.
        backend: the retention op's backend (``"auto"`` picks the best available).
        chunk_size: default chunk size for ``mode="chunkwise"``.
    """

    state_type = RetentionState

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
        if rope_layout not in rope.LAYOUTS:
            raise ValueError(f"rope_layout must be one of {rope.LAYOUTS}, got {rope_layout!r}")
        functional.check_mode("chunkwise", chunk_size)
        self.d_model, self.num_heads, self.head_dim, self.value_head_dim = d_model, H, Dk, value_dim // H
        self.gate, self.group_norm, self.norm = gate, group_norm, norm
        self.rotary, self.rope_layout = rotary, rope_layout
        self.backend, self.chunk_size = backend, chunk_size
        self.scaling = Dk**-0.5

        # Decays and angles are kept as float64 outside the module's buffers, so that model.to(bf16)
        # cannot round them; gammas travel to the op as Python floats (checked without a device sync).
        gammas = default_gammas(H, decay=decay, multi_scale=multi_scale) if gammas is None else gammas
        self.gammas = tuple(functional.check_gamma(gammas, H, torch.device("cpu")).tolist())
        self._theta = rope.angles(Dk, schedule=rope_schedule, base=rope_base) if rotary else None

        self.widths = [H * Dk, H * Dk, value_dim] + ([value_dim] if gate else [])
        self.in_proj = nn.Linear(d_model, sum(self.widths), bias=False)  # q, k, v, g in one matmul
        self.out_proj = nn.Linear(value_dim, d_model, bias=False)
        self.head_norm = HeadNorm(H, value_dim // H, norm, affine=norm_affine, eps=norm_eps) if group_norm else None
        self.conv = None if conv_size is None else ShortConv(sum(self.widths[:3]), conv_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Small input projections (as in the official code) keep early retention outputs tame.
        for block in self.in_proj.weight.split(self.widths, dim=0):
            nn.init.xavier_uniform_(block, gain=2**-2.5)
        nn.init.xavier_uniform_(self.out_proj.weight)

    def init_state(
        self, batch_size: int, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> RetentionState:
        shape = (batch_size, self.num_heads, self.head_dim, self.value_head_dim)
        kv = torch.zeros(shape, device=device, dtype=functional.state_dtype(dtype))
        conv = None if self.conv is None else self.conv.init_window(batch_size, device=device, dtype=dtype)
        return RetentionState(offset=0, kv=kv, conv=conv)

    def forward(
        self, x: Tensor, state: MixerState | None = None, *, mode: str = "parallel", chunk_size: int | None = None
    ) -> tuple[Tensor, RetentionState]:
        B, T = self.check_input(x)
        state = self.check_state(state, B)
        offset = 0 if state is None else state.offset
        H, Dk, Dv = self.num_heads, self.head_dim, self.value_head_dim
        qkv, *g = self.in_proj(x).split([sum(self.widths[:3]), *self.widths[3:]], dim=-1)
        window = conv_window(self.conv, state)
        if self.conv is not None:
            qkv, window = self.conv(qkv, window)
        qk, v = qkv.split([2 * H * Dk, self.widths[2]], dim=-1)
        qk = qk.unflatten(-1, (2, H, Dk))  # (B, T, 2, H, Dk): q and k, rotated and scaled in one pass
        if self.rotary:
            self._theta = self._theta.to(x.device)  # float64 angles follow the input, moved once not per call
            phase = rope.phases(self._theta, offset, T)  # (T, Dk/2), complex
            qk = rope.rotate(qk, torch.stack([phase, phase * self.scaling], dim=1)[:, :, None], layout=self.rope_layout)
        else:
            qk = qk * qk.new_tensor([1.0, self.scaling])[:, None, None]
        q, k = qk.unbind(2)
        o, kv = functional.retention(
            q,
            k,
            v.view(B, T, H, Dv),
            self.gammas,
            mode=mode,
            chunk_size=chunk_size if chunk_size is not None else self.chunk_size,
            initial_state=None if state is None else state.kv,
            backend=self.backend,
        )  # (B, T, H, Dv)
        y = o if self.head_norm is None else self.head_norm(o)  # keeps the op's layout: the gate transposes
        if self.gate:
            y = F.silu(g[0]).view(B, T, H, Dv) * y  # written in the gate's (B, T, H, Dv) layout
        return self.out_proj(y.reshape(B, T, H * Dv)), RetentionState(offset=offset + T, kv=kv, conv=window)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
            f"value_head_dim={self.value_head_dim}, gate={self.gate}, group_norm={self.group_norm}, "
            f"gammas={[round(g, 6) for g in self.gammas]}, conv_size={self.conv and self.conv.kernel_size}, "
            f"backend={self.backend!r}"
        )


@hookimpl
def register_mixers(register: MixerRegistrar) -> None:
    register(
        "retention",
        MultiScaleRetention,
        ops=("retention",),
        description="gated multi-scale retention (RetNet)",
    )
