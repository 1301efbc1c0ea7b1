"""What every op is made of: ``Op``, one registered object per op, and the checks of what backends return.

An op is its name, the typed signature its backends implement (a ``typing.Protocol``), its validation
(``prepare``: the public arguments in, an ``OpCall`` out: the backend's arguments and the specs of what it must
return), its state type, where its float64 reference and its conformance spec (hypothesis cases) live, and its
context-parallel form. Calling the ``Op`` validates, picks the backend from the registry, runs it (through the
generic custom op while compiling, for a backend dynamo cannot trace), checks its outputs, and handles packed
sequences and padded batches; so a plugin that brings an op of its own gets all of that by writing ``prepare``.
Everything here works from what the ``Op`` carries: no table anywhere knows the ops by name.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from mixers.catalogue import Backend, BackendOutputError
from mixers.ops import opaque
from mixers.ops.checks import _shape
from mixers.ops.packed import packed_call, padded_call
from mixers.registry import get_registry, resolve_backend


def _backend_fault(impl: Backend, mode: str, inputs: str, problem: str) -> BackendOutputError:
    alternatives = [name for name in sorted(get_registry().backends.get(impl.op, {})) if name != impl.name]
    return BackendOutputError(
        f"{get_registry().describe_backend(impl)} returned {problem}, for {inputs} in mode {mode!r}. The backend "
        f"is at fault, not the inputs: report it to the plugin's authors, or pick another backend with backend= "
        f"(installed: {alternatives})"
    )


def _pair(impl: Backend, mode: str, inputs: str, result: object, what: str, n: int = 2) -> tuple[object, ...]:
    if not isinstance(result, (tuple, list)) or len(result) != n:
        got = f"a {type(result).__name__}" + (f" of length {len(result)}" if isinstance(result, (tuple, list)) else "")
        raise _backend_fault(impl, mode, inputs, f"{got}; expected {'a pair' if n == 2 else f'{n} items'} {what}")
    return tuple(result)


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


def _fits(result: object, specs: Sequence[Spec], device: torch.device) -> bool:
    """Whether ``result`` is ``(o, final_state)`` as ``specs`` (``o``'s, then the state's) describe: the quick
    test every call takes, host metadata only; ``_verified`` explains a failure."""
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        return False
    out, final = result
    if len(specs) > 2:  # a state of several tensors
        if not isinstance(final, (tuple, list)):
            return False
        parts = (out, *final)
    else:
        parts = (out, final)
    if len(parts) != len(specs):
        return False
    for t, (_, shape, _, dtype) in zip(parts, specs, strict=True):
        if not isinstance(t, Tensor) or t.shape != shape or t.dtype != dtype or t.device != device:
            return False
    return True


def _verified(
    impl: Backend,
    mode: str,
    result: object,
    inputs: Callable[[], str],
    o: Spec,
    state: Sequence[Spec],
    device: torch.device,
) -> tuple[Tensor, Any]:
    """The ``(o, final_state)`` a backend returned, checked on every call against the specs of ``o`` and of
    the state (one tensor, or a tuple for several specs): its structure, shapes, dtypes and devices are
    metadata, read on the host without waiting for the device (the cost: docs/registry.md). ``inputs``
    describes the call, for the message (built only if needed). While compiling, the check runs when the
    graph is traced (nothing of it runs in the compiled graph)."""
    specs = [o, *state]
    if _fits(result, specs, device):
        return result  # type: ignore[return-value]
    where = inputs()
    out, final = _pair(impl, mode, where, result, "(o, final_state)")
    parts = [out, final]
    if len(state) > 1:
        names = ", ".join(spec[0].rsplit(".", 1)[-1] for spec in state)
        parts[1:] = _pair(impl, mode, where, final, f"({names}) as the final state", len(state))
    expected = [(name, t, shape, layout, dtype) for (name, shape, layout, dtype), t in zip(specs, parts, strict=True)]
    check_backend_outputs(impl, mode, where, expected, device)
    return result  # type: ignore[return-value]


@dataclass(frozen=True)
class OpCall:
    """One validated call of an op, ready for a backend.

    ``args``/``kwargs`` go to the backend's ``fn``; ``device``, ``dtype`` and ``mode`` choose it. ``o`` and
    ``state`` are the specs ``(name, shape, layout, dtype)`` of what it must return (one spec: the state is one
    tensor; several: a tuple of them), checked on every call. ``describe`` says what the inputs were, for
    messages; ``make_state`` turns the backend's state into the op's state type.
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    device: torch.device
    dtype: torch.dtype
    mode: str
    o: Spec
    state: Sequence[Spec]
    describe: Callable[[], str]
    make_state: Callable[[Any], Any] = lambda state: state


def _load(path: str) -> Any:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


@functools.cache
def _takes_packing(prepare: Callable[..., OpCall]) -> bool:
    try:
        return "cu_seqlens" in inspect.signature(prepare).parameters
    except (TypeError, ValueError):
        return False


@dataclass(frozen=True)
class ContextParallelForm:
    """How an op runs on one rank's tokens of a sequence split over ranks (``mixers.context_parallel``).

    ``local(arguments)``: this rank's contribution, a tuple of tensors of one dtype (retention: the state its own
    tokens leave, ``sum_s gamma^(L-1-s) k_s^T v_s``; softmax attention: its keys and values); every rank's are
    all-gathered in one differentiable collective. ``incoming(cp, gathered, arguments)``: the arguments to run this
    rank's tokens with, from what every rank contributed (each gathered tensor ``[K, ...]``, rank order), usually
    ``initial_state`` set to what the earlier ranks leave; ``cp`` gives ``rank``, ``world_size`` and ``earlier``.
    """

    local: Callable[[dict[str, Any]], tuple[Tensor, ...]]
    incoming: Callable[[Any, tuple[Tensor, ...], dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class Op:
    """One op, registered through the ``register_ops`` hook.

    Arguments:
        name: the registry name (``Backend.op`` of its backends).
        prepare: ``prepare(*args, **kwargs) -> OpCall``: the op's validation, on its public arguments
            (everything but ``backend``, ``cu_seqlens`` and ``attention_mask``). A ``prepare`` that also takes
            ``cu_seqlens`` (a ``mixers.packing.Packing``: inputs ``[1, T, ...]``, a state row per sequence) lets
            backends that declare ``packs=True`` compute a packed row in one call; without it, packed sequences
            run once per sequence.
        backend_signature: the ``typing.Protocol`` its backends' ``fn`` follows (documentation, and what a
            type checker holds a backend to).
        state_type: the type of the state it returns and takes back (``Tensor``, a NamedTuple), for messages.
        reference: ``"module:function"``, its float64 reference written from the formula (imported on use).
        testing: ``"module:ATTRIBUTE"``, its ``mixers.testing.OpSpec`` for the conformance kit (imported on use:
            it needs hypothesis).
        description: one line for ``seqmixers list``.
        sequences: the names of the arguments with time on dimension 1 (sliced per sequence for packed
            sequences); state_arg: the name of the state argument.
        context_parallel: its ``ContextParallelForm`` (``None``: it cannot run split over ranks).
    """

    name: str
    prepare: Callable[..., OpCall]
    backend_signature: type
    state_type: type | tuple[type, ...] | None = None
    reference: str | None = None
    testing: str | None = None
    description: str = ""
    sequences: tuple[str, ...] = ("q", "k", "v")
    state_arg: str = "initial_state"
    context_parallel: ContextParallelForm | None = None
    plugin: str = field(default="", compare=False)  # filled in by the registry

    @property
    def packs(self) -> bool:
        """Whether its validation takes ``cu_seqlens``, so that a packing backend gets whole packed rows."""
        return _takes_packing(self.prepare)

    def __call__(
        self,
        *args: Any,
        backend: str = "auto",
        cu_seqlens: Tensor | Any | None = None,
        attention_mask: Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, Any]:
        """Validate, dispatch to ``backend`` (``"auto"``: the best available), check what it returned.

        ``cu_seqlens`` (int ``[N+1]`` or a ``mixers.packing.Packing``): the sequence inputs hold N sequences packed
        in one row, each run from its own state (``initial_state`` with N rows, or zeros) with nothing crossing a
        boundary; the state comes back with N rows. ``attention_mask`` (0/1 ``[B, T]``): a padded batch, row b's
        real tokens where it is 1 (left or right padding); the outputs at padding are zeros, and the padding never
        reaches a real token (``mixers.ops.packed``)."""
        if attention_mask is not None:
            if cu_seqlens is not None:
                raise ValueError("give cu_seqlens (packed sequences) or attention_mask (a padded batch), not both")
            return padded_call(self, backend, args, kwargs, attention_mask)
        if cu_seqlens is not None:
            return packed_call(self, backend, args, kwargs, cu_seqlens)
        return self.run(backend, self.prepare(*args, **kwargs))

    def arguments(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """A call's arguments by name, as ``prepare`` takes them (for the paths that slice or replace some)."""
        return dict(inspect.signature(self.prepare).bind(*args, **kwargs).arguments)

    def resolve(self, backend: str, call: OpCall) -> Backend:
        """The backend that runs ``call``: ``backend`` by name, or the best available for ``"auto"``."""
        return resolve_backend(self.name, backend, device=call.device, dtype=call.dtype, mode=call.mode)

    def run(self, backend: str, call: OpCall) -> tuple[Tensor, Any]:
        """Run a validated call on ``backend`` and check what it returned."""
        impl = self.resolve(backend, call)
        if torch.is_autocast_enabled(call.device.type):
            # An op keeps its own precision (float32 accumulation for low-precision inputs): under autocast, its
            # matmuls would otherwise run, and write into float32 buffers, in the autocast dtype.
            with torch.autocast(call.device.type, enabled=False):
                result = self._kernel(impl, call)
        else:  # the usual case, and every decode step: no context to enter
            result = self._kernel(impl, call)
        o, state = _verified(impl, call.mode, result, call.describe, call.o, call.state, call.device)
        return o, call.make_state(state)

    def _kernel(self, impl: Backend, call: OpCall) -> Any:
        if not impl.traceable and torch.compiler.is_compiling():  # one opaque node in the compiled graph
            return opaque.call(impl.fn, f"{impl.op}/{impl.name}", call, self.state_arg)
        return impl.fn(*call.args, **call.kwargs)

    def load_reference(self) -> Callable[..., Any]:
        if self.reference is None:
            raise ValueError(f"op {self.name!r} names no float64 reference")
        return _load(self.reference)

    def load_testing(self) -> Any:
        if self.testing is None:
            raise ValueError(f"op {self.name!r} names no conformance spec (Op.testing)")
        return _load(self.testing)
