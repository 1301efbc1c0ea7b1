"""Backends that dynamo cannot trace, run inside ``torch.compile`` as one ``torch.library`` custom op.

A kernel that goes through CuPy, ctypes, numpy or a ``torch.compiler.disable`` region would break the graph of
every model using it, and ``fullgraph=True`` would refuse to compile. So when dynamo traces an op whose backend
says ``traceable=False``, the ``Op`` calls the kernel through ``seqmixers::opaque`` instead (``call``), which the
compiled graph holds as one opaque node; in eager mode the kernel is called directly.

The custom op is generic, the same for every op, a plugin's included: what it needs to know of the op comes from
the validated call (``OpCall``). Its inputs are the call's tensors, flattened; the rest of the call (modes, chunk
sizes, flags: constants of the traced graph) and the kernel are held in ``_CALLS`` under a string key that the
graph carries. Its fake implementation makes the outputs from the shapes and dtypes the op's validation promises
(``OpCall.o`` and ``OpCall.state``), which it receives as arguments, so symbolic shapes work.

Backward *recomputes*: it runs the kernel again with gradients enabled on detached copies of the inputs and asks
autograd for the gradients. That is right for any kernel that is differentiable in eager mode, and costs one more
forward per backward.

A custom op may not change its inputs, and a kernel may write its outputs into the state it was given (a KV cache
fills its free slots): the kernel gets copies of the state's tensors, one copy per call on this path only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

if TYPE_CHECKING:  # pragma: no cover
    from mixers.ops.base import OpCall

# Key -> (kernel, the call's structure, its non-tensor leaves, how many of the tensors are the state's). The kernel
# is held here, so its id (part of the key) cannot be reused by another function while a graph may name it.
_CALLS: dict[str, tuple[Callable[..., Any], pytree.TreeSpec, tuple[Any, ...], tuple[bool, ...], int]] = {}
_DTYPES = (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16, torch.int8,
    torch.uint8, torch.bool, torch.complex64, torch.complex128,
)  # fmt: skip


def _fresh(outputs: Sequence[Tensor], inputs: Sequence[Tensor | None]) -> list[Tensor]:
    """The outputs, contiguous as the fake implementation promises, each copied if it shares memory with an
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


def _unflatten(key: str, tensors: Sequence[Tensor | None]) -> tuple[Callable[..., Any], tuple, dict]:
    kernel, spec, constants, is_tensor, _ = _CALLS[key]
    found, fixed = iter(tensors), iter(constants)
    leaves = [next(found) if t else next(fixed) for t in is_tensor]
    args, kwargs = pytree.tree_unflatten(leaves, spec)
    return kernel, args, kwargs


def _outputs(result: Any) -> list[Tensor]:
    o, state = result
    return [o, *pytree.tree_leaves(state)]


@torch.library.custom_op("seqmixers::opaque", mutates_args=())
def opaque(tensors: list[Tensor], key: str, shapes: list[int], ranks: list[int], dtypes: list[int]) -> list[Tensor]:
    """The kernel of ``key`` on ``tensors`` (the call's tensors, flattened): ``[o, *state tensors]``."""
    n_state = _CALLS[key][4]
    own = [*tensors[: len(tensors) - n_state], *(t.clone() for t in tensors[len(tensors) - n_state :])]
    kernel, args, kwargs = _unflatten(key, own)
    with torch.no_grad():
        outputs = _outputs(kernel(*args, **kwargs))
    return _fresh(outputs, tensors)


@opaque.register_fake
def _(tensors, key, shapes, ranks, dtypes):
    device, out, at = tensors[0].device, [], 0
    for rank, dtype in zip(ranks, dtypes, strict=True):
        out.append(tensors[0].new_empty(shapes[at : at + rank], dtype=_DTYPES[dtype], device=device))
        at += rank
    return out


@contextlib.contextmanager
def _autograd_recording() -> Iterator[None]:
    """Autograd on, inside a custom op's implementation. The op runs below the autograd dispatch keys (torch
    excludes them while it redispatches), so that the kernel's own graph would not be recorded even with grad
    mode on; the recompute needs it, so the autograd keys are taken out of the excluded set."""
    excluded = torch._C._dispatch_tls_local_exclude_set()
    for name in ("AutogradFunctionality", "AutogradOther", "AutogradNestedTensor"):
        excluded = excluded.remove(getattr(torch._C.DispatchKey, name))
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), excluded), torch.enable_grad():
        yield


@torch.library.custom_op("seqmixers::opaque_backward", mutates_args=())
def opaque_backward(grads: list[Tensor], tensors: list[Tensor], key: str) -> list[Tensor]:
    """The gradients of the kernel's outputs, ``grads`` (empty for an output without one), with respect to each
    floating-point tensor of ``tensors``, by recomputation; an empty tensor for the others."""
    with _autograd_recording():
        leaves = [t.detach().requires_grad_() if t.is_floating_point() else t for t in tensors]
        kernel, args, kwargs = _unflatten(key, leaves)
        outputs = _outputs(kernel(*args, **kwargs))
        pairs = [(o, g) for o, g in zip(outputs, grads, strict=True) if g.numel() and o.requires_grad]
        wrt = [t for t in leaves if t.requires_grad]
        got = torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True)
    found = iter(got)
    result = []
    for t in leaves:
        g = next(found) if t.requires_grad else None
        result.append(t.new_empty(0) if not t.is_floating_point() else torch.zeros_like(t) if g is None else g)
    return _fresh(result, [*tensors, *grads])


@opaque_backward.register_fake
def _(grads, tensors, key):
    return [torch.empty_like(t) if t.is_floating_point() else t.new_empty(0) for t in tensors]


def _setup(ctx: Any, inputs: tuple, output: Any) -> None:
    tensors, key, *_ = inputs
    ctx.key = key
    ctx.save_for_backward(*tensors)


def _backward(ctx: Any, grads: list[Tensor | None]) -> tuple:
    tensors = ctx.saved_tensors
    dense = [g if g is not None else t.new_empty(0) for g, t in zip(grads, tensors, strict=False)]
    dense += [tensors[0].new_empty(0)] * (len(grads) - len(dense))
    got = opaque_backward(dense, list(tensors), ctx.key)
    return [g if t.is_floating_point() else None for g, t in zip(got, tensors, strict=True)], None, None, None, None


opaque.register_autograd(_backward, setup_context=_setup)


_TENSOR = "<a tensor of the call>"  # where a tensor sits in a call's skeleton (a string: a constant to dynamo)


@torch._dynamo.assume_constant_result
def _register(kernel: Callable[..., Any], name: str, skeleton: Any, state_arg: str) -> str:
    """The key of a call of ``kernel`` shaped as ``skeleton`` (the call's ``(args, kwargs)`` with each tensor
    replaced by ``_TENSOR``), registered in ``_CALLS``. Run by dynamo at trace time, not traced: the registration
    must exist before the compiled graph first runs (a traced side effect would be replayed only after it)."""
    key = f"{name}@{id(kernel):x}|{skeleton!r}"
    if key not in _CALLS:
        leaves, spec = pytree.tree_flatten(skeleton)
        is_tensor = tuple(isinstance(leaf, str) and leaf == _TENSOR for leaf in leaves)
        constants = tuple(leaf for leaf, t in zip(leaves, is_tensor, strict=True) if not t)
        n_state = sum(1 for leaf in pytree.tree_leaves(skeleton[1].get(state_arg)) if leaf == _TENSOR)
        _CALLS[key] = (kernel, spec, constants, is_tensor, n_state)
    return key


def arguments(kernel: Callable[..., Any], name: str, call: OpCall, state_arg: str) -> tuple[Any, ...]:
    """The arguments of ``seqmixers::opaque`` for ``kernel(*call.args, **call.kwargs)``: the call's tensors, the key
    of the rest (registered here), and the output specs. ``name`` is the backend's, for the key; ``state_arg``
    names the state argument (copied for the kernel: it comes last)."""
    kwargs = dict(call.kwargs)
    kwargs[state_arg] = kwargs.pop(state_arg, None)
    tree = (call.args, kwargs)
    skeleton = pytree.tree_map(lambda leaf: _TENSOR if isinstance(leaf, Tensor) else leaf, tree)
    specs = [call.o, *call.state]
    return (
        [leaf for leaf in pytree.tree_leaves(tree) if isinstance(leaf, Tensor)],
        _register(kernel, name, skeleton, state_arg),
        [size for _, shape, _, _ in specs for size in shape],
        [len(shape) for _, shape, _, _ in specs],
        [_DTYPES.index(dtype) for *_, dtype in specs],
    )


def call(kernel: Callable[..., Any], name: str, call: OpCall, state_arg: str) -> tuple[Tensor, Any]:
    """``kernel(*call.args, **call.kwargs)`` through ``seqmixers::opaque``, returned as the kernel returns it:
    ``(o, state)``, the state a tensor or a tuple of them as ``call.state`` describes."""
    outputs = opaque(*arguments(kernel, name, call, state_arg))
    return outputs[0], outputs[1] if len(outputs) == 2 else tuple(outputs[1:])
