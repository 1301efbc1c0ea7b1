"""Causal linear attention (Katharopoulos et al. 2020, "Transformers are RNNs") as the ``"linear_attention"`` mixer.

``y = W_O (swish(X W_G) * norm(LinAttn(phi(X W_Q), phi(X W_K), X W_V)))``, where the gate and the
per-head norm are optional (off by default, which is the paper's layer) and ``phi`` is a feature map
chosen by name from the registry. This module registers three: ``elu+1`` (the paper's), ``relu`` and
``identity``; a plugin adds more through the ``register_feature_maps`` hook.

Scaling. With ``normalize=True`` a scale on q cancels between numerator and denominator, so none is
applied. Without it, q is scaled by ``D'^-0.5`` (``D'`` the feature dimension), keeping the scores
``q . k`` at the size of scaled dot products; the sum then grows with t, which ``norm`` can absorb.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixers import functional
from mixers.hookspecs import hookimpl
from mixers.interface import MixerState, TokenMixer
from mixers.layers import HEAD_NORMS, HeadNorm, ShortConv, conv_window
from mixers.registry import FeatureMapRegistrar, MixerRegistrar, get_registry
from mixers.retention import check_value_dim, resolve_heads

NORMS = (None, *HEAD_NORMS)


def elu_plus_one(x: Tensor) -> Tensor:
    """``elu(x) + 1``: positive everywhere, so the normaliser is positive (the paper's choice)."""
    return F.elu(x) + 1


def relu(x: Tensor) -> Tensor:
    """``max(x, 0)``: non-negative, but a query or key can be all zero (then the guard is what decides)."""
    return F.relu(x)


def identity(x: Tensor) -> Tensor:
    """``x``: signed features, so the normaliser can cross zero; best used with ``normalize=False``."""
    return x


@dataclass
class LinearAttentionState(MixerState):
    """``kv = sum_s phi(k_s)^T v_s`` ``[B, H, D', Dv]`` and ``z = sum_s phi(k_s)`` ``[B, H, D']``
    (float32, or float64 for float64 inputs). Its size does not depend on the number of tokens."""

    kv: Tensor
    z: Tensor
    conv: Tensor | None = None  # with conv_size K: the last K-1 projected q, k, v inputs [B, K-1, C] (input dtype)


class LinearAttention(TokenMixer):
    """Causal linear attention with a registered feature map.

    Arguments:
        d_model: model width.
        num_heads / head_dim: heads and their q/k width (give either; default head dim 64, at most d_model).
        value_dim: total value width; default ``num_heads * head_dim``.
        feature_map: the registered name of ``phi`` (``"elu+1"``, ``"relu"``, ``"identity"``, or a plugin's).
        normalize: divide by ``phi(q_t) . sum_s phi(k_s)``; ``eps`` is the op's guard on that denominator.
        gate: a swish output gate. norm: a per-head norm of the output, ``None``, ``"groupnorm"``
            (LayerNorm per head) or ``"rmsnorm"``; ``norm_affine`` its weights, ``norm_eps`` its epsilon.
        conv_size: taps of a short causal convolution (then SiLU) on q, k, v before the feature map, as
            fla's and Zoology's recurrent models have; ``None`` (default): none, the paper's layer.
        backend: the linear-attention op's backend (``"auto"`` picks the best available).
        chunk_size: default chunk size for ``mode="chunkwise"``.
    """

    state_type = LinearAttentionState

    def __init__(
        self,
        d_model: int,
        *,
        num_heads: int | None = None,
        head_dim: int | None = None,
        value_dim: int | None = None,
        feature_map: str = "elu+1",
        normalize: bool = True,
        eps: float = 1e-6,
        gate: bool = False,
        norm: str | None = None,
        norm_affine: bool = True,
        norm_eps: float = 1e-5,
        conv_size: int | None = None,
        backend: str = "auto",
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        H, Dk = resolve_heads(d_model, num_heads, head_dim, default_head_dim=min(64, d_model))
        value_dim = check_value_dim(H * Dk if value_dim is None else value_dim, H)
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if not isinstance(normalize, bool):
            raise TypeError(f"normalize must be a bool, got {normalize!r}")
        functional.check_mode("chunkwise", chunk_size)
        self.eps = functional.check_eps(eps)
        self.phi = get_registry().get_feature_map(feature_map).fn
        self.feature_map = feature_map
        self.feature_dim = self._probe_feature_dim(H, Dk)
        self.d_model, self.num_heads, self.head_dim, self.value_head_dim = d_model, H, Dk, value_dim // H
        self.normalize, self.gate, self.norm = normalize, gate, norm
        self.backend, self.chunk_size = backend, chunk_size
        self.scaling = 1.0 if normalize else self.feature_dim**-0.5

        self.widths = [H * Dk, H * Dk, value_dim] + ([value_dim] if gate else [])
        self.in_proj = nn.Linear(d_model, sum(self.widths), bias=False)  # q, k, v, g in one matmul
        self.out_proj = nn.Linear(value_dim, d_model, bias=False)
        self.head_norm = None if norm is None else HeadNorm(H, value_dim // H, norm, affine=norm_affine, eps=norm_eps)
        self.conv = None if conv_size is None else ShortConv(sum(self.widths[:3]), conv_size)

    def _probe_feature_dim(self, H: int, Dk: int) -> int:
        """Run the feature map once on a dummy ``[1, 2, H, Dk]`` to learn (and check) its output width."""
        x = torch.zeros(1, 2, H, Dk)
        y = self.phi(x)
        if not isinstance(y, Tensor) or y.dim() != 4 or y.shape[:3] != x.shape[:3] or y.dtype != x.dtype:
            got = f"shape {list(y.shape)}, dtype {y.dtype}" if isinstance(y, Tensor) else type(y).__name__
            raise ValueError(
                f"feature map {self.feature_map!r} must map [B, T, H, D] to [B, T, H, D'] in the same dtype; "
                f"on [1, 2, {H}, {Dk}] float32 it returned {got}"
            )
        return y.shape[-1]

    def init_state(
        self, batch_size: int, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> LinearAttentionState:
        sd = functional.state_dtype(dtype)
        H, D, Dv = self.num_heads, self.feature_dim, self.value_head_dim
        return LinearAttentionState(
            offset=0,
            kv=torch.zeros(batch_size, H, D, Dv, device=device, dtype=sd),
            z=torch.zeros(batch_size, H, D, device=device, dtype=sd),
            conv=None if self.conv is None else self.conv.init_window(batch_size, device=device, dtype=dtype),
        )

    def forward(
        self, x: Tensor, state: MixerState | None = None, *, mode: str = "parallel", chunk_size: int | None = None
    ) -> tuple[Tensor, LinearAttentionState]:
        B, T = self.check_input(x)
        state = self.check_state(state, B)
        offset = 0 if state is None else state.offset
        H, Dk, Dv = self.num_heads, self.head_dim, self.value_head_dim
        qkv, *g = self.in_proj(x).split([sum(self.widths[:3]), *self.widths[3:]], dim=-1)
        window = conv_window(self.conv, state)
        if self.conv is not None:
            qkv, window = self.conv(qkv, window)
        q, k, v = qkv.split(self.widths[:3], dim=-1)
        q, k = self.phi(q.view(B, T, H, Dk)), self.phi(k.view(B, T, H, Dk))  # (B, T, H, D')
        o, (kv, z) = functional.linear_attention(
            q * self.scaling if self.scaling != 1.0 else q,
            k,
            v.view(B, T, H, Dv),
            mode=mode,
            chunk_size=chunk_size if chunk_size is not None else self.chunk_size,
            initial_state=None if state is None else (state.kv, state.z),
            normalize=self.normalize,
            eps=self.eps,
            backend=self.backend,
        )  # (B, T, H, Dv)
        y = o if self.head_norm is None else self.head_norm(o)
        if self.gate:
            y = F.silu(g[0]).view(B, T, H, Dv) * y
        return self.out_proj(y.reshape(B, T, H * Dv)), LinearAttentionState(offset=offset + T, kv=kv, z=z, conv=window)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
            f"value_head_dim={self.value_head_dim}, feature_map={self.feature_map!r}, normalize={self.normalize}, "
            f"gate={self.gate}, norm={self.norm!r}, conv_size={self.conv and self.conv.kernel_size}, "
            f"backend={self.backend!r}"
        )


@hookimpl
def register_feature_maps(register: FeatureMapRegistrar) -> None:
    register("elu+1", elu_plus_one, description="elu(x) + 1, positive (Katharopoulos et al. 2020)")
    register("relu", relu, description="max(x, 0), non-negative")
    register("identity", identity, description="x, signed (the normaliser can cross zero)")


@hookimpl
def register_mixers(register: MixerRegistrar) -> None:
    register(
        "linear_attention",
        LinearAttention,
        ops=("linear_attention",),
        description="causal linear attention with a registered feature map",
    )
