"""Public functional ops: the stable names and signatures that mixers, other issues and plugins rely on.

Each function here calls its op's ``Op`` object (``mixers/ops/<op>/``), which validates the inputs once, picks
a registered backend and checks what the backend returned (structure, shapes, dtypes, devices) on every
call, so that a wrong backend fails here, named with its plugin and distribution, rather than
somewhere downstream. Layout everywhere: ``[B, T, H, D]`` (batch, time, heads, head dim).

Each function is a one-line wrapper, documented here because this is where users read the signatures; everything
else about an op lives in its folder.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from mixers.ops.checks import DEFAULT_CHUNK_SIZE, MODES
from mixers.ops.gated_retention import GATED_RETENTION
from mixers.ops.linear_attention import LINEAR_ATTENTION, LinearState
from mixers.ops.retention import RETENTION
from mixers.ops.softmax_attention import SOFTMAX_ATTENTION, KVCache
from mixers.packing import Packing

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "MODES",
    "KVCache",
    "LinearState",
    "gated_retention",
    "linear_attention",
    "retention",
    "softmax_attention",
]


def retention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gamma: Tensor | float | Sequence[float],
    *,
    mode: str,
    chunk_size: int | None = None,
    initial_state: Tensor | None = None,
    backend: str = "auto",
    cu_seqlens: Tensor | Packing | None = None,
    attention_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Retention: ``o_t = sum_{s<=t} gamma^(t-s) (q_t . k_s) v_s + gamma^(t+1) q_t S_0``.

    Arguments:
        q, k: ``[B, T, H, Dk]``, already rotated and scaled (that is the mixer's job).
        v: ``[B, T, H, Dv]``.
        gamma: per-head decay ``[H]`` (or one float for all heads), ``0 < gamma <= 1``.
        mode: ``"parallel"`` (O(T^2), one matmul), ``"chunkwise"`` (parallel inside chunks of
            ``chunk_size`` tokens, recurrent across them; any chunk size, default 64) or
            ``"recurrent"`` (token by token). All three compute the same function.
        initial_state: ``[B, H, Dk, Dv]`` state ``S_0`` from an earlier call, or ``None`` for zeros.
        backend: a backend name, or ``"auto"`` for the best available one for these inputs.
        cu_seqlens: int32/int64 ``[N+1]`` (0, ..., T), or a ``mixers.packing.Packing`` made from it once for many
            calls: ``q, k, v`` are ``[1, T, ...]`` holding N sequences packed one after the other, each computed
            from its own state (``initial_state`` ``[N, ...]``, or zeros), nothing crossing a boundary; the final
            state is ``[N, ...]``.
        attention_mask: 0/1 ``[B, T]`` (instead of ``cu_seqlens``): a padded batch, row b's real tokens where it
            is 1, one run per row (left or right padding). Padding never reaches a real token (whatever it
            holds, NaN included); its outputs are zeros; the final state is that of each row's real tokens.

    Returns:
        ``(o, final_state)``: ``o`` is ``[B, T, H, Dv]`` in the dtype of ``q``; ``final_state`` is
        ``S_T = gamma^T S_0 + sum_s gamma^(T-1-s) k_s^T v_s``, ``[B, H, Dk, Dv]`` in float32
        (float64 for float64 inputs), ready to be passed back as ``initial_state``.
    """
    return RETENTION(
        q, k, v, gamma, mode=mode, chunk_size=chunk_size, initial_state=initial_state, backend=backend,
        cu_seqlens=cu_seqlens, attention_mask=attention_mask,
    )  # fmt: skip


def linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mode: str,
    chunk_size: int | None = None,
    initial_state: LinearState | tuple[Tensor, Tensor] | None = None,
    normalize: bool = True,
    eps: float = 1e-6,
    backend: str = "auto",
    cu_seqlens: Tensor | Packing | None = None,
    attention_mask: Tensor | None = None,
) -> tuple[Tensor, LinearState]:
    """Causal linear attention (Katharopoulos et al. 2020) on feature-mapped ``q, k``.

    ``o_t = (q_t kv_0 + sum_{s<=t} (q_t . k_s) v_s) / guard(q_t . (z_0 + sum_{s<=t} k_s))``, where the
    division happens only when ``normalize`` is set. ``guard(d)`` moves ``d`` away from zero while keeping
    its sign: ``d`` if ``|d| >= eps``, else ``eps`` for ``d >= 0`` and ``-eps`` for ``d < 0``. With
    non-negative features (``elu+1``, ``relu``) ``o_t`` is then a weighted mean of values scaled by
    ``min(1, d / eps)``, so ``|o_t| <= max |v|`` however small the normaliser; a token whose features are
    all zero gets ``o_t = 0``.

    Arguments:
        q, k: ``[B, T, H, Dk]``, already feature-mapped (the mixer's job).
        v: ``[B, T, H, Dv]``.
        mode: ``"parallel"``, ``"chunkwise"`` (any ``chunk_size``, default 64) or ``"recurrent"``; all
            three compute the same function.
        initial_state: ``(kv [B, H, Dk, Dv], z [B, H, Dk])`` from an earlier call, or ``None`` for zeros.
        normalize: divide by the guarded normaliser (``False``: the plain sum, ``o_t = q_t kv_t``).
        eps: the guard's threshold, compared with the normaliser in float32 (float64 for float64 inputs).
        backend: a backend name, or ``"auto"``.
        cu_seqlens, attention_mask: packed sequences or a padded batch, as for ``retention``.

    Returns:
        ``(o, final_state)``: ``o`` is ``[B, T, H, Dv]`` in the dtype of ``q``; ``final_state`` is a
        ``LinearState(kv, z)`` in float32 (float64 for float64 inputs). ``z`` is kept whether or not
        ``normalize`` is set, so one state serves both.
    """
    return LINEAR_ATTENTION(
        q, k, v, mode=mode, chunk_size=chunk_size, initial_state=initial_state, normalize=normalize, eps=eps,
        backend=backend, cu_seqlens=cu_seqlens, attention_mask=attention_mask,
    )  # fmt: skip


def softmax_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mode: str,
    chunk_size: int | None = None,
    initial_state: KVCache | tuple[Tensor, Tensor] | None = None,
    backend: str = "auto",
    cu_seqlens: Tensor | Packing | None = None,
    attention_mask: Tensor | None = None,
) -> tuple[Tensor, KVCache]:
    """Causal scaled dot-product attention, continuing from a KV cache.

    ``o_t = sum_{s<=t} exp(q_t . k_s / sqrt(Dk)) v_s / sum_{s<=t} exp(q_t . k_s / sqrt(Dk))``, where
    ``s`` runs over the ``Tc`` tokens the row's cache holds and then the new ones (query ``t`` sits at
    position ``Tc + t``); rows may hold different numbers of tokens (``KVCache.length``).

    Arguments:
        q: ``[B, T, H, Dk]``; k: ``[B, T, Hkv, Dk]``; v: ``[B, T, Hkv, Dv]``. ``Hkv`` must divide ``H``:
            query head ``h`` reads key/value head ``h // (H / Hkv)`` (grouped-query attention).
        mode: ``"parallel"`` (``torch.nn.functional.scaled_dot_product_attention``), ``"chunkwise"``
            (blockwise over keys with an online softmax, memory ``O(T * chunk_size)`` also in the
            backward pass; any ``chunk_size``, default 64) or ``"recurrent"`` (token by token against
            the cache). All three compute the same function up to rounding.
        initial_state: a ``KVCache(k [B, Hkv, C, Dk], v [B, Hkv, C, Dv], length [B])`` from an earlier call or
            ``init_state``, in the dtype of ``q`` (a pair ``(k, v)``: every row holds all ``C`` tokens), or
            ``None`` for an empty one.
        backend: a backend name, or ``"auto"``.
        cu_seqlens, attention_mask: packed sequences or a padded batch, as for ``retention``.

    Returns:
        ``(o, final_state)``: ``o`` is ``[B, T, H, Dv]`` in the dtype of ``q``; ``final_state`` is the cache with
        the new keys and values written after each row's tokens and ``length + T``. Its capacity is the given
        cache's when the tokens fit (they are written in place when no gradient is recorded: the tokens the
        given state holds never change), else at least twice that; without a cache it is ``T``.
    """
    return SOFTMAX_ATTENTION(
        q, k, v, mode=mode, chunk_size=chunk_size, initial_state=initial_state, backend=backend, cu_seqlens=cu_seqlens,
        attention_mask=attention_mask,
    )  # fmt: skip


def gated_retention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    *,
    mode: str,
    chunk_size: int | None = None,
    initial_state: Tensor | None = None,
    backend: str = "auto",
    cu_seqlens: Tensor | Packing | None = None,
    attention_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Gated retention (YOCO): retention with a decay per token and head, ``S_t = exp(g_t) S_{t-1} + k_t^T v_t``,
    ``o_t = q_t S_t``.

    That is ``o_t = sum_{s<=t} exp(g_{s+1} + ... + g_t) (q_t . k_s) v_s + exp(g_1 + ... + g_t) q_t S_0``. With
    ``g = log(gamma)`` everywhere it equals ``retention``; with ``g = 0``, ``linear_attention`` with
    ``normalize=False``.

    Arguments:
        q, k: ``[B, T, H, Dk]``, already rotated and scaled (the mixer's job); v: ``[B, T, H, Dv]``.
        g: ``[B, T, H]`` log decays, ``<= 0`` (YOCO: ``logsigmoid(x W_gamma) / 16``); ``-inf`` forgets the state.
            Any floating dtype (computed in float32, float64 for float64 inputs); gradients flow to it. Its
            values are not checked (that would wait for the device): a positive one makes the state grow.
        mode: ``"parallel"``, ``"chunkwise"`` (any ``chunk_size``, default 64) or ``"recurrent"``; all three
            compute the same function.
        initial_state: ``[B, H, Dk, Dv]`` state ``S_0`` from an earlier call, or ``None`` for zeros.
        backend: a backend name, or ``"auto"``.
        cu_seqlens, attention_mask: packed sequences or a padded batch, as for ``retention`` (``g`` is packed or
            padded like ``q``).

    Returns:
        ``(o, final_state)``: ``o`` is ``[B, T, H, Dv]`` in the dtype of ``q``; ``final_state`` is ``S_T``,
        ``[B, H, Dk, Dv]`` in float32 (float64 for float64 inputs), ready to be passed back as ``initial_state``.
    """
    return GATED_RETENTION(
        q, k, v, g, mode=mode, chunk_size=chunk_size, initial_state=initial_state, backend=backend,
        cu_seqlens=cu_seqlens, attention_mask=attention_mask,
    )  # fmt: skip
