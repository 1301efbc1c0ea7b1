"""Backends that dynamo cannot trace, run inside ``torch.compile`` as ``torch.library`` custom ops.

A kernel that goes through CuPy, ctypes, numpy or a ``torch.compiler.disable`` region would break the
graph of every model using it, and ``fullgraph=True`` would refuse to compile. The registry therefore
wraps the ``fn`` of a backend registered with ``traceable=False`` (``wrap``): eagerly the wrapper calls
the kernel directly, so eager code pays one branch; while compiling it calls one custom op per op kind
(``seqmixers::opaque_retention``, ``..._linear_attention``, ``..._softmax_attention``), which the
compiled graph holds as one opaque node. Each op takes the tensors, the plain arguments and a string
naming the kernel in ``_KERNELS``; its fake implementation derives the output shapes from the inputs.

Backward. A custom op needs a backward the compiler can also treat as opaque, so each op has a second
one (``..._backward``) that *recomputes*: it runs the kernel again with gradients enabled on detached
copies of the inputs and asks autograd for the gradients. That is right for any kernel that is
differentiable in eager mode (an ``autograd.Function`` of its own, say), and costs one more forward per
backward; a backend whose backward needs no forward could later register its own.

Ops other than the three built-in ones have no known signature: their kernels are only hidden from
dynamo (``torch.compiler.disable``), so a model using one compiles with a graph break, not fullgraph.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from mixers import functional

# Kernel key -> the backend's own fn. A key is "op/name#serial": a new serial per registration, so that a
# graph compiled against a backend that was later replaced (override=True) cannot silently call the new one.
_KERNELS: dict[str, Callable[..., Any]] = {}
_SERIAL = itertools.count(1)


def _fresh(outputs: Sequence[Tensor], inputs: Sequence[Tensor | None]) -> list[Tensor]:
    """The outputs, contiguous as the fake implementations promise, each copied if it shares memory with an
    input or an earlier output: a custom op returns new tensors (a kernel may hand back its cache input as is)."""
    seen = {t.untyped_storage().data_ptr() for t in inputs if t is not None and t.numel()}
    fresh = []
    for t in outputs:
        t = t.contiguous()
        if t.numel() and t.untyped_storage().data_ptr() in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        fresh.append(t)
    return fresh


@contextlib.contextmanager
def _autograd_recording() -> Iterator[None]:
    """Autograd on, inside a custom op's implementation. The op runs below the autograd dispatch keys (torch
    excludes them while it redispatches), so that the kernel's own graph would not be recorded even with grad
    mode on; the recompute needs it, so the autograd keys are taken out of the excluded set."""
    excluded = torch._C._dispatch_tls_local_exclude_set()
    for key in ("AutogradFunctionality", "AutogradOther", "AutogradNestedTensor"):
        excluded = excluded.remove(getattr(torch._C.DispatchKey, key))
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), excluded), torch.enable_grad():
        yield


def _recompute(
    run: Callable[..., Sequence[Tensor]], inputs: Sequence[Tensor | None], grads: Sequence[Tensor | None]
) -> list[Tensor | None]:
    """Gradients of ``run(*inputs)`` for the tensor inputs, by running it again with autograd on
    (``None`` for a ``None`` input; zeros for one the outputs do not depend on). The gradients are new tensors
    (autograd may hand back a gradient output as is, when an output is an input: the cache)."""
    with _autograd_recording():
        leaves = [None if t is None else t.detach().requires_grad_() for t in inputs]
        outputs = run(*leaves)
        pairs = [(o, g) for o, g in zip(outputs, grads, strict=True) if g is not None and o.requires_grad]
        wrt = [t for t in leaves if t is not None]
        got = iter(torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True))
    result = [None if t is None else next(got) for t in leaves]
    result = [g if g is not None or t is None else torch.zeros_like(t) for g, t in zip(result, leaves, strict=True)]
    present = _fresh([g for g in result if g is not None], [*inputs, *grads])
    return [None if g is None else present.pop(0) for g in result]


def _or_empty(t: Tensor | None, like: Tensor) -> Tensor:
    """A custom op returns tensors only: an absent gradient travels as an empty tensor."""
    return like.new_empty(0) if t is None else t


# -- retention ---------------------------------------------------------------------------------------------------
@torch.library.custom_op("seqmixers::opaque_retention", mutates_args=())
def opaque_retention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gamma: Tensor,
    initial_state: Tensor | None,
    mode: str,
    chunk_size: int | None,
    kernel: str,
) -> tuple[Tensor, Tensor]:
    """Retention by the kernel ``kernel`` (see ``mixers.functional.retention``)."""
    with torch.no_grad():
        o, s = _KERNELS[kernel](q, k, v, gamma, mode=mode, chunk_size=chunk_size, initial_state=initial_state)
    o, s = _fresh([o, s], [q, k, v, gamma, initial_state])
    return o, s


@opaque_retention.register_fake
def _(q, k, v, gamma, initial_state, mode, chunk_size, kernel):
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    return q.new_empty(B, T, H, Dv), q.new_empty(B, H, Dk, Dv, dtype=functional.state_dtype(q.dtype))


@torch.library.custom_op("seqmixers::opaque_retention_backward", mutates_args=())
def opaque_retention_backward(
    do: Tensor,
    ds: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gamma: Tensor,
    initial_state: Tensor | None,
    mode: str,
    chunk_size: int | None,
    kernel: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dq, dk, dv, d_initial_state)`` by recomputation; the last is empty without an initial state."""

    def run(q: Tensor, k: Tensor, v: Tensor, s0: Tensor | None) -> Sequence[Tensor]:
        return _KERNELS[kernel](q, k, v, gamma, mode=mode, chunk_size=chunk_size, initial_state=s0)

    dq, dk, dv, ds0 = _recompute(run, [q, k, v, initial_state], [do, ds])
    return dq, dk, dv, _or_empty(ds0, q)  # type: ignore[return-value]


@opaque_retention_backward.register_fake
def _(do, ds, q, k, v, gamma, initial_state, mode, chunk_size, kernel):
    s0 = q.new_empty(0) if initial_state is None else torch.empty_like(initial_state)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), s0


def _retention_setup(ctx, inputs, output) -> None:
    q, k, v, gamma, s0, *ctx.args = inputs
    ctx.save_for_backward(q, k, v, gamma, s0)


def _retention_backward(ctx, do, ds):
    q, k, v, gamma, s0 = ctx.saved_tensors
    dq, dk, dv, ds0 = opaque_retention_backward(do, ds, q, k, v, gamma, s0, *ctx.args)
    return dq, dk, dv, None, (None if s0 is None else ds0), None, None, None


opaque_retention.register_autograd(_retention_backward, setup_context=_retention_setup)


def _call_retention(kernel: str, q, k, v, gamma, *, mode, chunk_size, initial_state):
    return opaque_retention(q, k, v, gamma, initial_state, mode, chunk_size, kernel)


# -- linear attention --------------------------------------------------------------------------------------------
@torch.library.custom_op("seqmixers::opaque_linear_attention", mutates_args=())
def opaque_linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv0: Tensor | None,
    z0: Tensor | None,
    mode: str,
    chunk_size: int | None,
    normalize: bool,
    eps: float,
    kernel: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Linear attention by the kernel ``kernel``: ``(o, kv, z)`` (see ``mixers.functional.linear_attention``)."""
    state = None if kv0 is None else functional.LinearState(kv0, z0)
    with torch.no_grad():
        o, (kv, z) = _KERNELS[kernel](
            q, k, v, mode=mode, chunk_size=chunk_size, initial_state=state, normalize=normalize, eps=eps
        )
    o, kv, z = _fresh([o, kv, z], [q, k, v, kv0, z0])
    return o, kv, z


@opaque_linear_attention.register_fake
def _(q, k, v, kv0, z0, mode, chunk_size, normalize, eps, kernel):
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    sd = functional.state_dtype(q.dtype)
    return q.new_empty(B, T, H, Dv), q.new_empty(B, H, Dk, Dv, dtype=sd), q.new_empty(B, H, Dk, dtype=sd)


@torch.library.custom_op("seqmixers::opaque_linear_attention_backward", mutates_args=())
def opaque_linear_attention_backward(
    do: Tensor,
    dkv: Tensor,
    dz: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv0: Tensor | None,
    z0: Tensor | None,
    mode: str,
    chunk_size: int | None,
    normalize: bool,
    eps: float,
    kernel: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dq, dk, dv, d_kv0, d_z0)`` by recomputation; the last two are empty without an initial state."""

    def run(q: Tensor, k: Tensor, v: Tensor, kv0: Tensor | None, z0: Tensor | None) -> Sequence[Tensor]:
        state = None if kv0 is None else functional.LinearState(kv0, z0)
        o, (kv, z) = _KERNELS[kernel](
            q, k, v, mode=mode, chunk_size=chunk_size, initial_state=state, normalize=normalize, eps=eps
        )
        return o, kv, z

    dq, dk, dv, dkv0, dz0 = _recompute(run, [q, k, v, kv0, z0], [do, dkv, dz])
    return dq, dk, dv, _or_empty(dkv0, q), _or_empty(dz0, q)  # type: ignore[return-value]


@opaque_linear_attention_backward.register_fake
def _(do, dkv, dz, q, k, v, kv0, z0, mode, chunk_size, normalize, eps, kernel):
    states = [q.new_empty(0) if s is None else torch.empty_like(s) for s in (kv0, z0)]
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), *states


def _linear_setup(ctx, inputs, output) -> None:
    q, k, v, kv0, z0, *ctx.args = inputs
    ctx.save_for_backward(q, k, v, kv0, z0)


def _linear_backward(ctx, do, dkv, dz):
    q, k, v, kv0, z0 = ctx.saved_tensors
    dq, dk, dv, dkv0, dz0 = opaque_linear_attention_backward(do, dkv, dz, q, k, v, kv0, z0, *ctx.args)
    has_state = kv0 is not None
    return dq, dk, dv, (dkv0 if has_state else None), (dz0 if has_state else None), None, None, None, None, None


opaque_linear_attention.register_autograd(_linear_backward, setup_context=_linear_setup)


def _call_linear_attention(kernel: str, q, k, v, *, mode, chunk_size, initial_state, normalize, eps):
    kv0, z0 = (None, None) if initial_state is None else initial_state
    o, kv, z = opaque_linear_attention(q, k, v, kv0, z0, mode, chunk_size, normalize, eps, kernel)
    return o, (kv, z)


# -- softmax attention -------------------------------------------------------------------------------------------
def _cache(k: Tensor, v: Tensor, length: Tensor | None) -> Any:
    """A ``KVCache``: dense (every row holds all its tokens) without ``length``, else ``length[b]`` in row b."""
    if length is None or "length" not in functional.KVCache._fields:  # (a KVCache without lengths: older releases)
        return functional.KVCache(k, v)
    return functional.KVCache(k, v, length)


@torch.library.custom_op("seqmixers::opaque_softmax_attention", mutates_args=())
def opaque_softmax_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cache: Tensor | None,
    v_cache: Tensor | None,
    length: Tensor | None,
    mode: str,
    chunk_size: int | None,
    kernel: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Softmax attention by the kernel ``kernel``: ``(o, k_cache, v_cache, length)`` (see
    ``mixers.functional.softmax_attention``). The kernel gets copies of the cache, which it may fill in place
    (a custom op may not change its inputs): one copy of the cache per call, on this path only."""
    cache = None if k_cache is None else _cache(k_cache.clone(), v_cache.clone(), length)
    with torch.no_grad():
        o, final = _KERNELS[kernel](q, k, v, mode=mode, chunk_size=chunk_size, initial_state=cache)
    kc, vc = final[0], final[1]
    new_length = getattr(final, "length", None) if len(final) != 3 else final[2]
    if new_length is None:  # a cache without lengths: every row holds all its tokens
        new_length = torch.full((kc.shape[0],), kc.shape[2], dtype=torch.int64, device=kc.device)
    o, kc, vc, new_length = _fresh([o, kc, vc, new_length], [q, k, v, k_cache, v_cache, length])
    return o, kc, vc, new_length


@opaque_softmax_attention.register_fake
def _(q, k, v, k_cache, v_cache, length, mode, chunk_size, kernel):
    B, T, H, Dk = q.shape
    Hkv, Dv = v.shape[2], v.shape[3]
    if k_cache is None:
        L = T
    elif length is not None:  # a preallocated cache keeps its capacity; each row grows by T tokens
        L = k_cache.shape[2]
    else:  # a dense cache: the new tokens are appended
        L = k_cache.shape[2] + T
    new_length = q.new_empty(B, dtype=torch.int64)  # caches are head-major: [B, Hkv, L, D]
    return q.new_empty(B, T, H, Dv), q.new_empty(B, Hkv, L, Dk), q.new_empty(B, Hkv, L, Dv), new_length


@torch.library.custom_op("seqmixers::opaque_softmax_attention_backward", mutates_args=())
def opaque_softmax_attention_backward(
    do: Tensor,
    dk_out: Tensor,
    dv_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cache: Tensor | None,
    v_cache: Tensor | None,
    length: Tensor | None,
    mode: str,
    chunk_size: int | None,
    kernel: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dq, dk, dv, dk_cache, dv_cache)`` by recomputation; the last two are empty without a cache."""

    def run(q: Tensor, k: Tensor, v: Tensor, kc: Tensor | None, vc: Tensor | None) -> Sequence[Tensor]:
        cache = None if kc is None else _cache(kc, vc, length)
        o, final = _KERNELS[kernel](q, k, v, mode=mode, chunk_size=chunk_size, initial_state=cache)
        return o, final[0], final[1]

    dq, dk, dv, dkc, dvc = _recompute(run, [q, k, v, k_cache, v_cache], [do, dk_out, dv_out])
    return dq, dk, dv, _or_empty(dkc, q), _or_empty(dvc, q)  # type: ignore[return-value]


@opaque_softmax_attention_backward.register_fake
def _(do, dk_out, dv_out, q, k, v, k_cache, v_cache, length, mode, chunk_size, kernel):
    caches = [q.new_empty(0) if c is None else torch.empty_like(c) for c in (k_cache, v_cache)]
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), *caches


def _softmax_setup(ctx, inputs, output) -> None:
    q, k, v, kc, vc, length, *ctx.args = inputs
    ctx.save_for_backward(q, k, v, kc, vc, length)


def _softmax_backward(ctx, do, dk_out, dv_out, _dlength):
    q, k, v, kc, vc, length = ctx.saved_tensors
    dq, dk, dv, dkc, dvc = opaque_softmax_attention_backward(do, dk_out, dv_out, q, k, v, kc, vc, length, *ctx.args)
    cached = kc is not None
    return dq, dk, dv, (dkc if cached else None), (dvc if cached else None), None, None, None, None


opaque_softmax_attention.register_autograd(_softmax_backward, setup_context=_softmax_setup)


def _call_softmax_attention(kernel: str, q, k, v, *, mode, chunk_size, initial_state):
    kc, vc = (None, None) if initial_state is None else (initial_state[0], initial_state[1])
    length = getattr(initial_state, "length", None)
    o, kc, vc, new_length = opaque_softmax_attention(q, k, v, kc, vc, length, mode, chunk_size, kernel)
    return o, _cache(kc, vc, new_length)


_CALLERS: dict[str, Callable[..., Any]] = {
    "retention": _call_retention,
    "linear_attention": _call_linear_attention,
    "softmax_attention": _call_softmax_attention,
}


# -- the wrapper the registry installs ---------------------------------------------------------------------------
def is_wrapped(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` is already a ``wrap``per (a backend put back by ``temporary_backend`` is not wrapped twice)."""
    return getattr(fn, "opaque_kernel", None) is not None


def wrap(op: str, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` (backend ``name`` of ``op``) as a function that runs it directly in eager mode and through
    its op's custom op while dynamo traces; for an op without one, ``fn`` hidden from dynamo."""
    call = _CALLERS.get(op)
    if call is None:
        return torch.compiler.disable(fn)
    kernel = f"{op}/{name}#{next(_SERIAL)}"
    _KERNELS[kernel] = fn

    @functools.wraps(fn, updated=())  # not fn's __dict__: a torch.compiler.disable mark there would be copied
    def opaque_fn(*args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            return call(kernel, *args, **kwargs)
        return fn(*args, **kwargs)

    opaque_fn.opaque_kernel = kernel  # type: ignore[attr-defined]
    return opaque_fn
