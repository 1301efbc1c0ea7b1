"""Public functional ops: validate inputs once, then dispatch to a registered backend.

The names and signatures here are a stable API that mixers, other issues and plugins rely on.
Layout everywhere: ``[B, T, H, D]`` (batch, time, heads, head dim). Backends receive validated inputs,
so each backend stays a plain tensor function. What a backend returns is checked too (structure, shapes,
dtypes, devices) on its first call per shape class, so that a wrong backend fails here, named with its
plugin and distribution, rather than somewhere downstream.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from mixers.registry import Backend, BackendOutputError, get_registry, resolve_backend

MODES = ("parallel", "chunkwise", "recurrent")
DEFAULT_CHUNK_SIZE = 64


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype recurrent states are kept in: float32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def _shape(t: Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_mode(mode: str, chunk_size: int | None) -> int | None:
    """Validate ``mode`` and ``chunk_size``; return the chunk size to use (``None`` unless chunkwise)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
            raise TypeError(f"chunk_size must be an int >= 1 or None, got {type(chunk_size).__name__} {chunk_size!r}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if mode != "chunkwise":
        return None
    return DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size


def _check_each(q: Tensor, k: Tensor, v: Tensor) -> None:
    """Each of q, k, v is a floating-point tensor of rank 4."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have rank 4 [B, T, H, D], got rank {t.dim()} with shape {_shape(t)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def _check_shared(q: Tensor, k: Tensor, v: Tensor) -> None:
    """q, k, v share one dtype and one device."""
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")


def check_qkv(q: Tensor, k: Tensor, v: Tensor) -> tuple[int, int, int, int, int]:
    """Check ``q, k: [B, T, H, Dk]`` and ``v: [B, T, H, Dv]``; return ``(B, T, H, Dk, Dv)``."""
    _check_each(q, k, v)
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q [B, T, H, Dk] = {_shape(q)}, got {_shape(k)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, T, H, Dv] with B, T, H = {tuple(q.shape[:3])} as in q, got {_shape(v)}")
    _check_shared(q, k, v)
    B, T, H, Dk = q.shape
    _check_widths(H, Dk, v.shape[-1])
    return B, T, H, Dk, v.shape[-1]


def _check_widths(H: int, Dk: int, Dv: int) -> None:
    """Heads and head widths are at least 1 (B and T may be 0: an empty batch or input is valid)."""
    for name, value in (("H (heads)", H), ("Dk (the q/k head width)", Dk), ("Dv (the v head width)", Dv)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")


def check_state(
    state: Tensor | None, name: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device
) -> None:
    """Check that a state tensor has exactly the expected shape, dtype and device."""
    if state is None:
        return
    if not isinstance(state, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(state).__name__}")
    if tuple(state.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {_shape(state)}")
    if state.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {state.dtype}")
    if state.device != device:
        raise ValueError(f"{name} must be on device {device}, got {state.device}")


def check_gamma(gamma: Tensor | float | Sequence[float], H: int, device: torch.device) -> Tensor:
    """Return ``gamma`` as a float64 tensor ``[H]`` on ``device``, after checking 0 < gamma <= 1.

    Python floats are checked on the host, so a mixer passing its decays as floats costs no device sync.
    Decays are not learnable: a tensor that requires grad is rejected (``ValueError``) rather than detached.
    """
    if isinstance(gamma, (int, float)) and not isinstance(gamma, bool):
        gamma = [float(gamma)] * H
    if isinstance(gamma, Tensor):
        if gamma.requires_grad:
            raise ValueError(
                "gamma must not require grad: decays are fixed hyperparameters here, and not every backend computes "
                "a gradient for them (the CuPy kernels do not), so a learnable gamma could silently never learn; "
                "got a tensor with requires_grad=True. Pass gamma.detach() to use its current value"
            )
        g = gamma.detach()
        if g.dim() == 0:
            g = g.expand(H)
        if g.dim() != 1 or g.shape[0] != H:
            raise ValueError(f"gamma must have shape [H] = [{H}], got {_shape(g)}")
        g = g.to(device=device, dtype=torch.float64)
        if bool((~((g > 0) & (g <= 1))).any()):  # also catches NaN
            raise ValueError(f"gamma must lie in (0, 1], got {g.tolist()}")
        return g
    if not isinstance(gamma, Sequence) or not all(
        isinstance(x, (int, float)) and not isinstance(x, bool) for x in gamma
    ):
        raise TypeError(f"gamma must be a tensor [H], a float or a sequence of floats, got {gamma!r}")
    if len(gamma) != H:
        raise ValueError(f"gamma must have H = {H} values, got {len(gamma)}")
    if not all(0 < x <= 1 for x in gamma):  # NaN fails the comparison too
        raise ValueError(f"gamma must lie in (0, 1], got {list(gamma)}")
    return torch.tensor(gamma, dtype=torch.float64, device=device)


# -- what backends return ------------------------------------------------------------------------------
# Shape classes whose outputs were checked, per backend: a backend is checked on its first call with each
# (mode, chunk size, dtype, device, input shapes, state or not), then trusted, so the per-token cost of
# decoding stays one set lookup. Bounded: forgotten wholesale when full (the checks are cheap to redo).
_CHECKED: set[Hashable] = set()
_MAX_CHECKED = 4096


def _remember(key: Hashable) -> None:
    if len(_CHECKED) >= _MAX_CHECKED:
        _CHECKED.clear()
    _CHECKED.add(key)


def _backend_fault(impl: Backend, mode: str, inputs: str, problem: str) -> BackendOutputError:
    alternatives = [name for name in sorted(get_registry().backends.get(impl.op, {})) if name != impl.name]
    return BackendOutputError(
        f"{get_registry().describe_backend(impl)} returned {problem}, for {inputs} in mode {mode!r}. The backend "
        f"is at fault, not the inputs: report it to the plugin's authors, or pick another backend with backend= "
        f"(installed: {alternatives})"
    )


def _pair(impl: Backend, mode: str, inputs: str, result: object, what: str) -> tuple[object, object]:
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        got = f"a {type(result).__name__}" + (f" of length {len(result)}" if isinstance(result, (tuple, list)) else "")
        raise _backend_fault(impl, mode, inputs, f"{got}; expected a pair {what}")
    return result[0], result[1]


def check_backend_outputs(
    impl: Backend,
    mode: str,
    inputs: str,
    expected: Sequence[tuple[str, object, Sequence[int], str, torch.dtype]],
    device: torch.device,
) -> None:
    """Check each ``(name, tensor, shape, layout, dtype)`` a backend returned, all on ``device``; raise a
    ``BackendOutputError`` naming the backend, its plugin and distribution. Public for plugins' own ops."""
    for name, t, shape, layout, dtype in expected:
        if not isinstance(t, Tensor):
            raise _backend_fault(impl, mode, inputs, f"{name} as a {type(t).__name__}; expected a torch.Tensor")
        if tuple(t.shape) != tuple(shape):
            problem = f"{name} of shape {_shape(t)}; expected {list(shape)} ({layout})"
            raise _backend_fault(impl, mode, inputs, problem)
        if t.dtype != dtype:
            raise _backend_fault(impl, mode, inputs, f"{name} of dtype {t.dtype}; expected {dtype}")
        if t.device != device:
            raise _backend_fault(impl, mode, inputs, f"{name} on device {t.device}; expected {device}")


Spec = tuple[str, Sequence[int], str, torch.dtype]  # (name, shape, layout, dtype) of one output tensor


def _verified(
    impl: Backend,
    mode: str,
    key: Hashable,
    result: object,
    inputs: Callable[[], str],
    o: Spec,
    state: Sequence[Spec],
    device: torch.device,
) -> tuple[Tensor, Any]:
    """The ``(o, final_state)`` a backend returned, checked on its first call of the shape class ``key``
    against the specs of ``o`` and of the state (one tensor, or a pair for two specs); later calls of
    the class cost one set lookup. ``inputs`` describes the call, for the message (built only if needed)."""
    if key in _CHECKED:
        return result  # type: ignore[return-value]
    where = inputs()
    out, final = _pair(impl, mode, where, result, "(o, final_state)")
    parts = [out, final]
    if len(state) == 2:
        names = ", ".join(spec[0].rsplit(".", 1)[-1] for spec in state)
        parts[1:] = _pair(impl, mode, where, final, f"({names}) as the final state")
    specs = [o, *state]
    expected = [(name, t, shape, layout, dtype) for (name, shape, layout, dtype), t in zip(specs, parts, strict=True)]
    check_backend_outputs(impl, mode, where, expected, device)
    _remember(key)
    return result  # type: ignore[return-value]


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

    Returns:
        ``(o, final_state)``: ``o`` is ``[B, T, H, Dv]`` in the dtype of ``q``; ``final_state`` is
        ``S_T = gamma^T S_0 + sum_s gamma^(T-1-s) k_s^T v_s``, ``[B, H, Dk, Dv]`` in float32
        (float64 for float64 inputs), ready to be passed back as ``initial_state``.
    """
    B, T, H, Dk, Dv = check_qkv(q, k, v)
    chunk = check_mode(mode, chunk_size)
    g = check_gamma(gamma, H, q.device)
    check_state(initial_state, "initial_state", (B, H, Dk, Dv), state_dtype(q.dtype), q.device)
    impl = resolve_backend("retention", backend, device=q.device, dtype=q.dtype, mode=mode)
    result = impl.fn(q, k, v, g, mode=mode, chunk_size=chunk, initial_state=initial_state)
    key = ("retention", impl.name, impl.fn, mode, chunk, q.dtype, q.device, q.shape, Dv, initial_state is None)
    return _verified(
        impl,
        mode,
        key,
        result,
        lambda: f"q {_shape(q)}, v {_shape(v)}",
        ("o", (B, T, H, Dv), "[B, T, H, Dv]", q.dtype),
        [("final_state", (B, H, Dk, Dv), "[B, H, Dk, Dv]", state_dtype(q.dtype))],
        q.device,
    )


class LinearState(NamedTuple):
    """Linear attention's state after ``t`` tokens: ``kv = sum_s k_s^T v_s`` ``[B, H, Dk, Dv]`` and the
    normaliser ``z = sum_s k_s`` ``[B, H, Dk]`` (float32, or float64 for float64 inputs)."""

    kv: Tensor
    z: Tensor


class KVCache(NamedTuple):
    """Softmax attention's state: every key ``[B, Tc, Hkv, Dk]`` and value ``[B, Tc, Hkv, Dv]`` seen so far,
    in the dtype of the inputs (they are stored, not accumulated, so nothing is gained by widening)."""

    k: Tensor
    v: Tensor


def _check_pair(state: object, name: str, fields: str) -> tuple[object, object] | None:
    if state is None:
        return None
    if not isinstance(state, (tuple, list)) or len(state) != 2:
        raise TypeError(f"{name} must be None or a pair {fields}, got {type(state).__name__}")
    return state[0], state[1]


def check_linear_state(
    state: object, B: int, H: int, Dk: int, Dv: int, dtype: torch.dtype, device: torch.device
) -> LinearState | None:
    """Check a linear-attention state ``(kv [B, H, Dk, Dv], z [B, H, Dk])``; return it as a ``LinearState``."""
    pair = _check_pair(state, "initial_state", "(kv [B, H, Dk, Dv], z [B, H, Dk]) such as a LinearState")
    if pair is None:
        return None
    kv, z = pair
    if kv is None or z is None:
        raise TypeError("initial_state must hold two tensors (kv, z), got None in it")
    check_state(kv, "initial_state.kv", (B, H, Dk, Dv), state_dtype(dtype), device)
    check_state(z, "initial_state.z", (B, H, Dk), state_dtype(dtype), device)
    return LinearState(kv, z)


def check_eps(eps: float) -> float:
    """Check a denominator guard: a finite float > 0."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0 < eps < math.inf):
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    return float(eps)


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

    Returns:
        ``(o, final_state)``: ``o`` is ``[B, T, H, Dv]`` in the dtype of ``q``; ``final_state`` is a
        ``LinearState(kv, z)`` in float32 (float64 for float64 inputs). ``z`` is kept whether or not
        ``normalize`` is set, so one state serves both.
    """
    B, T, H, Dk, Dv = check_qkv(q, k, v)
    chunk = check_mode(mode, chunk_size)
    state = check_linear_state(initial_state, B, H, Dk, Dv, q.dtype, q.device)
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__} {normalize!r}")
    eps = check_eps(eps)
    impl = resolve_backend("linear_attention", backend, device=q.device, dtype=q.dtype, mode=mode)
    result = impl.fn(q, k, v, mode=mode, chunk_size=chunk, initial_state=state, normalize=normalize, eps=eps)
    key = ("linear_attention", impl.name, impl.fn, mode, chunk, q.dtype, q.device, q.shape, Dv, state is None)
    sd = state_dtype(q.dtype)
    o, (kv, z) = _verified(
        impl,
        mode,
        key,
        result,
        lambda: f"q {_shape(q)}, v {_shape(v)}",
        ("o", (B, T, H, Dv), "[B, T, H, Dv]", q.dtype),
        [("final_state.kv", (B, H, Dk, Dv), "[B, H, Dk, Dv]", sd), ("final_state.z", (B, H, Dk), "[B, H, Dk]", sd)],
        q.device,
    )
    return o, LinearState(kv, z)


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
    """Check a KV cache ``(k [B, Tc, Hkv, Dk], v [B, Tc, Hkv, Dv])`` against the new keys; return a ``KVCache``."""
    pair = _check_pair(cache, "initial_state", "(k [B, Tc, Hkv, Dk], v [B, Tc, Hkv, Dv]) such as a KVCache")
    if pair is None:
        return None
    for name, t, D in (("k", pair[0], Dk), ("v", pair[1], Dv)):
        what = f"initial_state.{name} (the {'key' if name == 'k' else 'value'} cache)"
        if not isinstance(t, Tensor):
            raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{what} must have rank 4 [B, Tc, Hkv, {name.upper()}D], got shape {_shape(t)}")
        if t.shape[0] != B:
            raise ValueError(f"{what} was built for batch size {t.shape[0]}, but q has batch size {B}")
        if t.shape[2] != Hkv:
            raise ValueError(f"{what} holds {t.shape[2]} heads, but k and v have {Hkv} heads")
        if t.shape[3] != D:
            raise ValueError(f"{what} has head dim {t.shape[3]}, but {name} has head dim {D}")
        if t.dtype != dtype:
            raise TypeError(f"{what} must have the dtype of q, {dtype}, got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{what} must be on device {device}, got {t.device}")
    kc, vc = pair
    if kc.shape[1] != vc.shape[1]:
        raise ValueError(f"initial_state k and v caches must hold as many tokens, got {kc.shape[1]} and {vc.shape[1]}")
    return KVCache(kc, vc)


def softmax_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mode: str,
    chunk_size: int | None = None,
    initial_state: KVCache | tuple[Tensor, Tensor] | None = None,
    backend: str = "auto",
) -> tuple[Tensor, KVCache]:
    """Causal scaled dot-product attention, continuing from a KV cache.

    ``o_t = sum_{s<=t} exp(q_t . k_s / sqrt(Dk)) v_s / sum_{s<=t} exp(q_t . k_s / sqrt(Dk))``, where
    ``s`` runs over the ``Tc`` cached tokens and then the new ones (query ``t`` sits at position ``Tc + t``).

    Arguments:
        q: ``[B, T, H, Dk]``; k: ``[B, T, Hkv, Dk]``; v: ``[B, T, Hkv, Dv]``. ``Hkv`` must divide ``H``:
            query head ``h`` reads key/value head ``h // (H / Hkv)`` (grouped-query attention).
        mode: ``"parallel"`` (``torch.nn.functional.scaled_dot_product_attention``), ``"chunkwise"``
            (blockwise over keys with an online softmax, memory ``O(T * chunk_size)`` also in the
            backward pass; any ``chunk_size``, default 64) or ``"recurrent"`` (token by token against
            the cache). All three compute the same function up to rounding.
        initial_state: a ``KVCache(k [B, Tc, Hkv, Dk], v [B, Tc, Hkv, Dv])`` from an earlier call, in the
            dtype of ``q``, or ``None`` for an empty one.
        backend: a backend name, or ``"auto"``.

    Returns:
        ``(o, final_state)``: ``o`` is ``[B, T, H, Dv]`` in the dtype of ``q``; ``final_state`` is the cache
        with the new keys and values appended (``Tc + T`` tokens; it grows with the sequence).
    """
    B, T, H, Hkv, Dk, Dv = check_qkv_grouped(q, k, v)
    chunk = check_mode(mode, chunk_size)
    cache = check_kv_cache(initial_state, B, Hkv, Dk, Dv, q.dtype, q.device)
    impl = resolve_backend("softmax_attention", backend, device=q.device, dtype=q.dtype, mode=mode)
    result = impl.fn(q, k, v, mode=mode, chunk_size=chunk, initial_state=cache)
    Tc = 0 if cache is None else cache.k.shape[1]
    # The cache grows by a token per decoding step: its length is not part of the shape class (with or without).
    key = ("softmax_attention", impl.name, impl.fn, mode, chunk, q.dtype, q.device, q.shape, Hkv, Dv, Tc > 0)
    o, (k_cache, v_cache) = _verified(
        impl,
        mode,
        key,
        result,
        lambda: f"q {_shape(q)}, k {_shape(k)}, v {_shape(v)}, a cache of {Tc} tokens",
        ("o", (B, T, H, Dv), "[B, T, H, Dv]", q.dtype),
        [
            ("final_state.k", (B, Tc + T, Hkv, Dk), "[B, Tc + T, Hkv, Dk]", q.dtype),
            ("final_state.v", (B, Tc + T, Hkv, Dv), "[B, Tc + T, Hkv, Dv]", q.dtype),
        ],
        q.device,
    )
    return o, KVCache(k_cache, v_cache)
