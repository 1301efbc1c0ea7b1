"""Causal multi-head softmax attention as the ``"softmax_attention"`` mixer: the baseline the others replace.

``y = W_O Attn(rot(X W_Q), rot(X W_K), X W_V)`` with rotary position embedding (RoFormer) on q and k
and optional grouped-query heads (``num_kv_heads < num_heads``: several query heads share one key/value
head, which shrinks the KV cache by ``num_heads / num_kv_heads``).

The state is the KV cache: the rotated keys and the values of every token so far. It grows with the
sequence, and decoding a token costs time linear in the cache length; that growth is what retention
and linear attention remove. Keys are cached after rotation, at their absolute positions, so the new
tokens are rotated from ``state.offset`` on and a hand-over continues positions exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mixers import functional
from mixers import rotary as rope
from mixers.hookspecs import hookimpl
from mixers.interface import MixerState, TokenMixer
from mixers.registry import MixerRegistrar
from mixers.retention import resolve_heads


@dataclass
class SoftmaxAttentionState(MixerState):
    """The KV cache: rotated keys ``k [B, Tc, Hkv, Dk]`` and values ``v [B, Tc, Hkv, Dk]`` in the input dtype."""

    k: Tensor
    v: Tensor


class SoftmaxAttention(TokenMixer):
    """Causal softmax attention with rotary positions and optional grouped-query heads.

    Arguments:
        d_model: model width.
        num_heads / head_dim: query heads and their width (give either; default head dim 64, at most d_model).
        num_kv_heads: key/value heads, dividing ``num_heads`` (default ``num_heads``: plain multi-head;
            1: multi-query attention).
        rotary: rotate q, k by position; ``rope_layout`` ``"interleaved"`` (pairs 2i, 2i+1) or ``"half"``
            (pairs i, i + D/2, the GPT-NeoX/LLaMA layout), ``rope_schedule`` ``"rope"``/``"linspace"``,
            ``rope_base``.
        bias: biases on the projections.
        backend: the softmax-attention op's backend (``"auto"`` picks the best available).
        chunk_size: default key-block size for ``mode="chunkwise"``.
    """

    state_type = SoftmaxAttentionState

    def __init__(
        self,
        d_model: int,
        *,
        num_heads: int | None = None,
        head_dim: int | None = None,
        num_kv_heads: int | None = None,
        rotary: bool = True,
        rope_layout: str = "interleaved",
        rope_schedule: str = "rope",
        rope_base: float = 10000.0,
        bias: bool = False,
        backend: str = "auto",
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        H, Dk = resolve_heads(d_model, num_heads, head_dim, default_head_dim=min(64, d_model))
        Hkv = H if num_kv_heads is None else num_kv_heads
        if isinstance(Hkv, bool) or not isinstance(Hkv, int) or Hkv < 1 or H % Hkv:
            raise ValueError(f"num_kv_heads must be a positive divisor of num_heads={H}, got {num_kv_heads!r}")
        if rope_layout not in rope.LAYOUTS:
            raise ValueError(f"rope_layout must be one of {rope.LAYOUTS}, got {rope_layout!r}")
        functional.check_mode("chunkwise", chunk_size)
        self.d_model, self.num_heads, self.num_kv_heads, self.head_dim = d_model, H, Hkv, Dk
        self.rotary, self.rope_layout = rotary, rope_layout
        self.backend, self.chunk_size = backend, chunk_size
        # float64 angles outside the buffers, so that model.to(bf16) cannot round them (as in retention)
        self._theta = rope.angles(Dk, schedule=rope_schedule, base=rope_base) if rotary else None

        self.widths = [H * Dk, Hkv * Dk, Hkv * Dk]
        self.in_proj = nn.Linear(d_model, sum(self.widths), bias=bias)  # q, k, v in one matmul
        self.out_proj = nn.Linear(H * Dk, d_model, bias=bias)

    def init_state(
        self, batch_size: int, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> SoftmaxAttentionState:
        shape = (batch_size, 0, self.num_kv_heads, self.head_dim)
        return SoftmaxAttentionState(
            offset=0,
            k=torch.zeros(shape, device=device, dtype=dtype),
            v=torch.zeros(shape, device=device, dtype=dtype),
        )

    def forward(
        self, x: Tensor, state: MixerState | None = None, *, mode: str = "parallel", chunk_size: int | None = None
    ) -> tuple[Tensor, SoftmaxAttentionState]:
        B, T = self.check_input(x)
        state = self.check_state(state, B)
        offset = 0 if state is None else state.offset
        H, Hkv, Dk = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = self.in_proj(x).split(self.widths, dim=-1)
        q, k, v = q.view(B, T, H, Dk), k.view(B, T, Hkv, Dk), v.view(B, T, Hkv, Dk)
        if self.rotary:
            self._theta = self._theta.to(x.device)  # float64 angles follow the input, moved once not per call
            phase = rope.phases(self._theta, offset, T)[:, None]  # (T, 1, Dk/2), complex
            q = rope.rotate(q, phase, layout=self.rope_layout)
            k = rope.rotate(k, phase, layout=self.rope_layout)
        o, (k_cache, v_cache) = functional.softmax_attention(
            q,
            k,
            v,
            mode=mode,
            chunk_size=chunk_size if chunk_size is not None else self.chunk_size,
            initial_state=None if state is None else (state.k, state.v),
            backend=self.backend,
        )  # (B, T, H, Dk)
        y = self.out_proj(o.reshape(B, T, H * Dk))
        return y, SoftmaxAttentionState(offset=offset + T, k=k_cache, v=v_cache)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
            f"head_dim={self.head_dim}, rotary={self.rotary}, backend={self.backend!r}"
        )


@hookimpl
def register_mixers(register: MixerRegistrar) -> None:
    register(
        "softmax_attention",
        SoftmaxAttention,
        ops=("softmax_attention",),
        description="causal softmax attention with rotary positions and grouped-query heads (KV cache)",
    )
