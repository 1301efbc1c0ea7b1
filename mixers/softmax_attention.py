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

import torch
from torch import Tensor

from mixers.catalogue import MixerRegistrar
from mixers.hookspecs import hookimpl
from mixers.interface import MixerState
from mixers.layers import ProjectedMixer, Rotary, resolve_heads
from mixers.ops.softmax_attention import SOFTMAX_ATTENTION, KVCache
from mixers.packing import Packing


class SoftmaxAttention(ProjectedMixer):
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

    The state's ``op`` is the ``KVCache``: rotated keys ``k [B, Hkv, C, Dk]`` and values ``v [B, Hkv, C, Dk]``
    in the input dtype. From ``init_state(B, max_len=C)`` it is preallocated for ``C`` tokens and written in
    place (the static decode path); from a call without a state it holds the tokens seen and grows when needed.
    """

    ops = ("softmax_attention",)
    context_parallel = True  # runs split over ranks (mixers.context_parallel)
    op_state_type = KVCache

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
        self.num_heads, self.num_kv_heads, self.head_dim = H, Hkv, Dk
        self.rope = Rotary(Dk, layout=rope_layout, schedule=rope_schedule, base=rope_base) if rotary else None
        self.init_frame(
            d_model, [H * Dk, Hkv * Dk, Hkv * Dk], H * Dk, bias=bias, backend=backend, chunk_size=chunk_size
        )

    def init_state(
        self,
        batch_size: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        max_len: int | None = None,
    ) -> MixerState:
        """An empty cache: of no tokens (it grows as tokens come), or preallocated for ``max_len`` tokens, which
        the static decode path writes in place and a compiled decode step needs (its shapes never change)."""
        shape = (batch_size, self.num_kv_heads, 0 if max_len is None else max_len, self.head_dim)
        k, v = torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype)
        length = torch.zeros(batch_size, dtype=torch.int64, device=device)
        return MixerState.start(KVCache(k, v, length), batch_size, device=device)

    def mix(
        self, x: Tensor, state: MixerState | None, cu_seqlens: Packing | None, mode: str, chunk_size: int | None
    ) -> tuple[Tensor, MixerState]:
        B, T = x.shape[:2]
        H, Hkv, Dk = self.num_heads, self.num_kv_heads, self.head_dim
        qkv, _, _ = self.project(x, state, cu_seqlens)
        q, k, v = qkv.split(self.widths, dim=-1)
        q, k, v = q.view(B, T, H, Dk), k.view(B, T, Hkv, Dk), v.view(B, T, Hkv, Dk)
        if self.rope is not None:
            q, k = self.rope.rotate_all([q, k], self.positions(state, cu_seqlens))
        o, cache = self.run_op(
            SOFTMAX_ATTENTION,
            q,
            k,
            v,
            mode=mode,
            chunk_size=chunk_size,
            initial_state=None if state is None else state.op,
            backend=self.backend,
            cu_seqlens=cu_seqlens,
        )  # (B, T, H, Dk)
        return self.output(o, None), self.next_state(state, x, cache, cu_seqlens)

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
