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

import torch
import torch.nn.functional as F
from torch import Tensor

from mixers.catalogue import FeatureMapRegistrar, MixerRegistrar
from mixers.hookspecs import hookimpl
from mixers.interface import MixerState
from mixers.layers import HEAD_NORMS, HeadNorm, ProjectedMixer, check_value_dim, resolve_heads
from mixers.ops.checks import state_dtype
from mixers.ops.linear_attention import LINEAR_ATTENTION, LinearState, check_eps
from mixers.packing import Packing
from mixers.registry import get_registry

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


class LinearAttention(ProjectedMixer):
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

    The state's ``op`` is a ``LinearState``: ``kv = sum_s phi(k_s)^T v_s`` ``[B, H, D', Dv]`` and
    ``z = sum_s phi(k_s)`` ``[B, H, D']`` (float32, or float64 for float64 inputs), whatever the number of
    tokens; its ``conv``, with ``conv_size`` K, the last K-1 projected q, k, v inputs.
    """

    ops = ("linear_attention",)
    context_parallel = True  # runs split over ranks (mixers.context_parallel)
    op_state_type = LinearState

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
        self.eps = check_eps(eps)
        self.phi = get_registry().get_feature_map(feature_map).fn
        self.feature_map = feature_map
        self.feature_dim = self._probe_feature_dim(H, Dk)
        self.num_heads, self.head_dim, self.value_head_dim = H, Dk, value_dim // H
        self.normalize, self.norm = normalize, norm
        self.scaling = 1.0 if normalize else self.feature_dim**-0.5
        head_norm = None if norm is None else HeadNorm(H, value_dim // H, norm, affine=norm_affine, eps=norm_eps)
        self.init_frame(
            d_model, [H * Dk, H * Dk, value_dim], value_dim, gate=gate, head_norm=head_norm, conv_size=conv_size,
            backend=backend, chunk_size=chunk_size,
        )  # fmt: skip

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
        self,
        batch_size: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        max_len: int | None = None,  # the state has a fixed size: nothing to preallocate
    ) -> MixerState:
        sd = state_dtype(dtype)
        H, D, Dv = self.num_heads, self.feature_dim, self.value_head_dim
        op = LinearState(
            kv=torch.zeros(batch_size, H, D, Dv, device=device, dtype=sd),
            z=torch.zeros(batch_size, H, D, device=device, dtype=sd),
        )
        conv = None if self.conv is None else self.conv.init_window(batch_size, device=device, dtype=dtype)
        return MixerState.start(op, batch_size, device=device, conv=conv)

    def mix(
        self, x: Tensor, state: MixerState | None, cu_seqlens: Packing | None, mode: str, chunk_size: int | None
    ) -> tuple[Tensor, MixerState]:
        B, T = x.shape[:2]
        H, Dk, Dv = self.num_heads, self.head_dim, self.value_head_dim
        qkv, g, window = self.project(x, state, cu_seqlens)
        q, k, v = qkv.split(self.widths[:3], dim=-1)
        q, k = self.phi(q.view(B, T, H, Dk)), self.phi(k.view(B, T, H, Dk))  # (B, T, H, D')
        o, op_state = self.run_op(
            LINEAR_ATTENTION,
            q * self.scaling if self.scaling != 1.0 else q,
            k,
            v.view(B, T, H, Dv),
            mode=mode,
            chunk_size=chunk_size,
            initial_state=None if state is None else state.op,
            normalize=self.normalize,
            eps=self.eps,
            backend=self.backend,
            cu_seqlens=cu_seqlens,
        )  # (B, T, H, Dv)
        return self.output(o, g), self.next_state(state, x, op_state, cu_seqlens, conv=window)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
            f"value_head_dim={self.value_head_dim}, feature_map={self.feature_map!r}, normalize={self.normalize}, "
            f"gate={self.gate}, norm={self.norm!r}, {self.frame_repr()}"
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
