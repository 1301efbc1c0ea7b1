"""The ``softmax_attention`` op: causal scaled dot-product attention continuing from a KV cache.

Its state is a ``KVCache(k, v, length)``: a capacity of slots per row, of which each row holds its first
``length[b]``. Its float64 reference is in ``reference.py``, its conformance spec in ``testing.py``; the torch
backend is ``mixers/backends/torch_softmax_attention.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import torch
from torch import Tensor

from mixers.hookspecs import hookimpl
from mixers.ops.base import ContextParallelForm, Op, OpCall
from mixers.ops.checks import _check_each, _check_shared, _check_widths, _shape, check_mode

if TYPE_CHECKING:  # pragma: no cover
    from mixers.packing import Packing


class KVCache(NamedTuple):
    """Softmax attention's state: keys ``k [B, Hkv, C, Dk]`` and values ``v [B, Hkv, C, Dv]`` in the dtype of the
    inputs (stored, not accumulated, so nothing is gained by widening), of which row ``b`` holds the first
    ``length[b]`` tokens (int64 ``[B]``). Head-major, as gpt-fast keeps it: a decode step reads each head's keys
    as one contiguous block. The ``C - length[b]`` slots after them are free: the op writes new
    tokens there, in place when no gradient is being recorded (the static decode path preallocates ``C``), and
    grows the cache (to at least twice its capacity) when a call brings more tokens than fit. ``length=None``
    (as from a plain ``(k, v)`` pair) means every row holds all ``C`` tokens."""

    k: Tensor
    v: Tensor
    length: Tensor | None = None

    @classmethod
    def cat(cls, caches: list[KVCache]) -> KVCache:
        """One cache whose rows are those of ``caches`` (capacities padded with free slots to the largest)."""
        C = max(c.k.shape[2] for c in caches)

        def pad(t: Tensor) -> Tensor:
            extra = C - t.shape[2]
            return t if extra == 0 else torch.cat([t, t.new_zeros(t.shape[0], t.shape[1], extra, t.shape[3])], dim=2)

        return cls(
            torch.cat([pad(c.k) for c in caches]),
            torch.cat([pad(c.v) for c in caches]),
            torch.cat([c.held().length if c.length is None else c.length for c in caches]),
        )

    def held(self) -> KVCache:
        """The tokens held, without free slots: ``max(length)`` tokens, zeros past a shorter row's length (a
        device sync; for comparing caches of different capacities, as tests do)."""
        if self.length is None:
            return KVCache(self.k, self.v, torch.full(self.k.shape[:1], self.k.shape[2], device=self.k.device))
        n = int(self.length.max()) if self.length.numel() else 0
        keep = (torch.arange(self.k.shape[2], device=self.k.device) < self.length[:, None])[:, None, :n, None]
        return KVCache(self.k[:, :, :n] * keep, self.v[:, :, :n] * keep, self.length)


def check_qkv_grouped(q: Tensor, k: Tensor, v: Tensor) -> tuple[int, int, int, int, int, int]:
    """Check ``q: [B, T, H, Dk]``, ``k: [B, T, Hkv, Dk]``, ``v: [B, T, Hkv, Dv]`` with ``Hkv`` dividing ``H``
    (grouped-query attention; ``Hkv = H`` is plain multi-head). Return ``(B, T, H, Hkv, Dk, Dv)``."""
    _check_each(q, k, v)
    B, T, H, Dk = q.shape
    Hkv = k.shape[2]
    if k.shape[:2] != q.shape[:2] or k.shape[3] != Dk:
        raise ValueError(f"k must be [B, T, Hkv, Dk] with B, T, Dk = {B}, {T}, {Dk} as in q, got {_shape(k)}")
    if Hkv < 1 or H % Hkv:
        raise ValueError(f"k must have a number of heads Hkv dividing the H = {H} heads of q, got Hkv = {Hkv}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v must be [B, T, Hkv, Dv] with B, T, Hkv = {tuple(k.shape[:3])} as in k, got {_shape(v)}")
    _check_shared(q, k, v)
    _check_widths(H, Dk, v.shape[-1])
    return B, T, H, Hkv, Dk, v.shape[-1]


def check_kv_cache(
    cache: object, B: int, Hkv: int, Dk: int, Dv: int, dtype: torch.dtype, device: torch.device
) -> KVCache | None:
    """Check a KV cache ``(k [B, Hkv, C, Dk], v [B, Hkv, C, Dv], length [B] or None)`` against the new keys;
    return it as a ``KVCache`` with its ``length`` (a pair ``(k, v)`` holds all ``C`` tokens in every row)."""
    if cache is None:
        return None
    if not isinstance(cache, (tuple, list)) or len(cache) not in (2, 3):
        raise TypeError(
            "initial_state must be None, a KVCache(k [B, Hkv, C, Dk], v [B, Hkv, C, Dv], length [B]) or a pair "
            f"(k, v), got {type(cache).__name__}"
            + (f" of length {len(cache)}" if isinstance(cache, (tuple, list)) else "")
        )
    for name, t, D in (("k", cache[0], Dk), ("v", cache[1], Dv)):
        what = f"initial_state.{name} (the {'key' if name == 'k' else 'value'} cache)"
        if not isinstance(t, Tensor):
            raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{what} must have rank 4 [B, Hkv, C, {name.upper()}D], got shape {_shape(t)}")
        if t.shape[0] != B:
            raise ValueError(f"{what} was built for batch size {t.shape[0]}, but q has batch size {B}")
        if t.shape[1] != Hkv:
            raise ValueError(f"{what} holds {t.shape[1]} heads, but k and v have {Hkv} heads")
        if t.shape[3] != D:
            raise ValueError(f"{what} has head dim {t.shape[3]}, but {name} has head dim {D}")
        if t.dtype != dtype:
            raise TypeError(f"{what} must have the dtype of q, {dtype}, got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{what} must be on device {device}, got {t.device}")
    kc, vc = cache[0], cache[1]
    if kc.shape[2] != vc.shape[2]:
        raise ValueError(f"initial_state k and v caches must hold as many tokens, got {kc.shape[2]} and {vc.shape[2]}")
    length = cache[2] if len(cache) == 3 else None
    if length is None:
        return KVCache(kc, vc, torch.full((B,), kc.shape[2], dtype=torch.int64, device=device))
    if not isinstance(length, Tensor):
        raise TypeError(f"initial_state.length must be an int64 tensor [B] or None, got {type(length).__name__}")
    if length.dim() != 1 or length.shape[0] != B:
        raise ValueError(
            f"initial_state.length (tokens held per row) was built for batch size "
            f"{length.shape[0] if length.dim() == 1 else _shape(length)}, but q has batch size {B}"
        )
    if length.dtype != torch.int64:
        raise TypeError(f"initial_state.length must have dtype torch.int64, got {length.dtype}")
    if length.device != device:
        raise ValueError(f"initial_state.length must be on device {device}, got {length.device}")
    return KVCache(kc, vc, length)


def _room(cache: KVCache, T: int | Tensor) -> KVCache:
    """``cache`` with room for ``T`` more tokens in every row (``T [B]``: ``T[b]`` in row b), grown (to at least
    twice its capacity, so that a token-by-token loop copies O(1) per token on average) when a row would
    overflow. Checking costs a device sync, so a compiled graph skips it: there the capacity must have been
    preallocated (``init_state(max_len)``), and a write past it fails in the indexing kernel."""
    C = cache.k.shape[2]
    if torch.compiler.is_compiling() or (isinstance(T, int) and T == 0):
        return cache
    if isinstance(T, Tensor):
        needed = int((cache.length + T).max()) if cache.length.numel() else 0
    else:
        needed = int(cache.length.max()) + T if cache.length.numel() else T
    if needed <= C:
        return cache
    new = max(needed, 2 * C)

    def grow(t: Tensor) -> Tensor:
        return torch.cat([t, t.new_zeros(t.shape[0], t.shape[1], new - C, t.shape[3])], dim=2)

    return KVCache(grow(cache.k), grow(cache.v), cache.length)


class SoftmaxAttentionBackend(Protocol):
    """What a softmax-attention backend's ``fn`` is called with (validated; a cache has room for the new
    tokens) and returns: ``(o, (k, v, length))``, the cache of the same capacity with the new tokens written
    after each row's ``length`` (a backend must not change the slots the given cache holds)."""

    def __call__(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        mode: str,
        chunk_size: int | None,
        initial_state: KVCache | None,
        cu_seqlens: Packing | None = None,  # only for a backend with packs=True: B = 1, a cache row per sequence
    ) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]: ...


def prepare(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mode: str,
    chunk_size: int | None = None,
    initial_state: KVCache | tuple[Tensor, Tensor] | None = None,
    cu_seqlens: Packing | None = None,
) -> OpCall:
    """Validate a softmax-attention call (see ``mixers.functional.softmax_attention``); grow a cache without
    room for the new tokens. With ``cu_seqlens`` (packed sequences in one row) the cache has a row per sequence,
    each with room for the longest sequence, and without a cache each row's capacity is the longest sequence."""
    B, T, H, Hkv, Dk, Dv = check_qkv_grouped(q, k, v)
    chunk = check_mode(mode, chunk_size)
    rows = B if cu_seqlens is None else cu_seqlens.n
    cache = check_kv_cache(initial_state, rows, Hkv, Dk, Dv, q.dtype, q.device)
    if cache is not None:
        cache = _room(cache, T if cu_seqlens is None else cu_seqlens.lengths)
    longest = T if cu_seqlens is None else cu_seqlens.longest
    C = longest if cache is None else cache.k.shape[2]
    return OpCall(
        args=(q, k, v),
        kwargs={
            "mode": mode,
            "chunk_size": chunk,
            "initial_state": cache,
            **({} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}),
        },  # fmt: skip
        device=q.device,
        dtype=q.dtype,
        mode=mode,
        o=("o", (B, T, H, Dv), "[B, T, H, Dv]", q.dtype),
        state=[
            ("final_state.k", (rows, Hkv, C, Dk), "[B, Hkv, C, Dk]", q.dtype),
            ("final_state.v", (rows, Hkv, C, Dv), "[B, Hkv, C, Dv]", q.dtype),
            ("final_state.length", (rows,), "[B]", torch.int64),
        ],
        describe=lambda: f"q {_shape(q)}, k {_shape(k)}, v {_shape(v)}, a cache of capacity {C}",
        make_state=lambda state: KVCache(*state),
    )


def _local(arguments: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """This rank's keys and values: every rank attends over those of the ranks up to it."""
    return arguments["k"], arguments["v"]


def _incoming(cp: Any, gathered: tuple[Tensor, ...], arguments: dict[str, Any]) -> dict[str, Any]:
    """This rank's queries over the keys and values of ranks ``0..r``: the earlier ones as a KV cache. Its own
    keys are read from the gathered copy too, so that every rank's backward reaches the gather."""
    ks, vs = gathered  # [K, B, L, Hkv, D]
    r, (_, B, L, Hkv, _) = cp.rank, ks.shape

    def cache(t: Tensor) -> Tensor:  # ranks 0..r-1 as a cache [B, Hkv, r L, D]
        return t[:r].permute(1, 3, 0, 2, 4).reshape(B, Hkv, r * L, t.shape[-1])

    return {**arguments, "k": ks[r], "v": vs[r], "initial_state": KVCache(cache(ks), cache(vs))}


SOFTMAX_ATTENTION = Op(
    "softmax_attention",
    prepare,
    SoftmaxAttentionBackend,
    state_type=KVCache,
    reference="mixers.ops.softmax_attention.reference:softmax_attention_reference",
    testing="mixers.ops.softmax_attention.testing:SPEC",
    description="causal softmax attention with a KV cache (grouped-query heads, per-row lengths)",
    context_parallel=ContextParallelForm(_local, _incoming),
)


@hookimpl
def register_ops(register) -> None:  # noqa: ANN001 - an OpRegistrar
    register(SOFTMAX_ATTENTION)
