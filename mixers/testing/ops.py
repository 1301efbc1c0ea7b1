"""What the kit needs to know about an op to check a backend of it: ``OpSpec``.

Each op's spec lives in its folder (``mixers/ops/<op>/testing.py``) and is found through the registered ``Op``
(``Op.testing``); ``OP_SPECS`` maps every registered op that has one to it. A plugin that brings an op of its own
writes an ``OpSpec`` (cases, how to call the op, a float64 reference) and names it in its ``Op``, or passes it
to ``mixers.testing.check_op_backend``; see ``docs/plugins.md``.

An op's validation is checked with ``BadInput`` cases: each is one invalid call and the fragments its error
message must contain (what was expected and what was given), so a vague message fails. ``standard_bad_inputs``
derives them from any op's inputs and state; a spec may list its own (``OpSpec.bad_inputs``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from hypothesis import strategies as st
from torch import Tensor

from mixers.ops.checks import state_dtype as _state_dtype
from mixers.testing.strategies import OpInputs


def raw_state_tensors(state: Any) -> tuple[Tensor, ...]:
    """An op's state as a tuple of tensors, as held: ``None`` -> ``()``, a tensor -> ``(t,)``, a tuple -> its
    tensors (``None`` fields left out)."""
    if state is None:
        return ()
    if isinstance(state, Tensor):
        return (state,)
    return tuple(t for t in state if t is not None)


def state_tensors(state: Any) -> tuple[Tensor, ...]:
    """An op's state as the tensors to compare: ``raw_state_tensors`` of what it holds (a state with a ``held()``
    method, such as a ``KVCache``, without its free slots). Integer fields (a cache's lengths) come in the
    dtype of the first tensor, so that they compare (exactly: they are small whole numbers) like the others."""
    if hasattr(state, "held"):
        state = state.held()
    tensors = raw_state_tensors(state)
    return tuple(t if t.is_floating_point() else t.to(tensors[0].dtype) for t in tensors)


@dataclass(frozen=True)
class OpSpec:
    """How to check backends of one op.

    Arguments:
        op: the op's registry name (``Backend.op``).
        cases: ``cases(dtypes=..., max_T=...)``, a strategy of cases; a case has ``T``, ``chunk_size``,
            ``dtype`` and ``inputs(requires_grad=False, device=None) -> OpInputs``.
        call: ``call(seq, const, state, *, mode, chunk_size, backend) -> (o, state)``: the public op.
        reference: ``reference(inputs) -> (o, state)`` in float64, written from the formula.
        magnitude: ``magnitude(inputs) -> (o, state)``, the size rounding errors scale with (the same
            sums over absolute values), or ``None`` to compare relative to the reference itself.
        state_dtype: the dtype of the returned state's tensors for inputs of a dtype.
        bad_inputs: ``bad_inputs(inputs, state) -> [BadInput]``, the invalid calls the op must reject with
            a message naming the problem, given valid inputs and a state the op returned for them;
            ``None`` for ``standard_bad_inputs``.
    """

    op: str
    cases: Callable[..., st.SearchStrategy[Any]]
    call: Callable[..., tuple[Tensor, Any]]
    reference: Callable[[OpInputs], tuple[Tensor, Any]]
    magnitude: Callable[[OpInputs], tuple[Tensor, Any]] | None = None
    state_dtype: Callable[[torch.dtype], torch.dtype] = _state_dtype
    bad_inputs: Callable[[OpInputs, Any], list[BadInput]] | None = None


KEEP: Any = type("Keep", (), {"__repr__": lambda self: "KEEP"})()  # a BadInput field left as in the valid call


@dataclass(frozen=True)
class BadInput:
    """One invalid call of an op, and what its error must say.

    The call is the valid one with the ``seq`` and ``const`` entries given here replaced, and ``state``,
    ``mode`` and ``chunk_size`` where given. The op must raise ``ValueError`` or ``TypeError`` whose message
    contains every one of ``fragments``: what was expected and what was given, so that "invalid input" fails.
    """

    what: str
    fragments: tuple[str, ...]
    seq: Mapping[str, Any] = field(default_factory=dict)
    const: Mapping[str, Any] = field(default_factory=dict)
    state: Any = KEEP
    mode: str | None = None
    chunk_size: Any = KEEP


def shape_str(t: Tensor) -> str:
    """A shape as the core's messages print it: ``[2, 5, 3]``."""
    return str(list(t.shape))


def bad_modes() -> list[BadInput]:
    """An unknown mode: the message names it and the modes there are."""
    return [BadInput("an unknown mode", ("'sideways'", "'parallel'"), mode="sideways")]


def bad_chunk_sizes() -> list[BadInput]:
    """Chunk size 0 in chunkwise mode: the message names chunk_size, the bound and the value."""
    return [BadInput("chunk size 0", ("chunk_size", ">= 1", "0"), mode="chunkwise", chunk_size=0)]


def bad_ranks(inputs: OpInputs, layout: str | None = None) -> list[BadInput]:
    """Each sequence input without its batch dimension: the message names the input, the ``layout`` it must
    have (when given, such as ``"[B, T, H, D]"``) and the shape it got."""
    cases = []
    for name, t in sorted(inputs.seq.items()):
        expected = (layout,) if layout is not None else ()
        cases.append(
            BadInput(f"{name} without its batch dimension", (name, *expected, shape_str(t[0])), seq={name: t[0]})
        )
    return cases


def each_state_tensor(state: Any, change: Callable[[Tensor], Tensor]) -> list[tuple[int, Tensor, Tensor, Any]]:
    """``(i, tensor, changed, state with only tensor i changed)`` for each tensor of ``state``."""
    tensors = raw_state_tensors(state)
    out = []
    for i, t in enumerate(tensors):
        changed = change(t)
        out.append(
            (i, t, changed, replace_state_tensors(state, [changed if j == i else u for j, u in enumerate(tensors)]))
        )
    return out


def bad_state_batches(state: Any) -> list[BadInput]:
    """Each state tensor for one more batch entry: the message names initial_state, the shape it must have and
    the shape it got."""
    return [
        BadInput(f"state[{i}] for another batch size", ("initial_state", shape_str(t), shape_str(bad)), state=bad_state)
        for i, t, bad, bad_state in each_state_tensor(state, lambda t: torch.cat([t, t[:1]]))
    ]


def bad_state_dtypes(state: Any) -> list[BadInput]:
    """Each state tensor in another dtype: the message names initial_state, the dtype it must have and the one
    it got."""

    def other(t: Tensor) -> Tensor:
        return t.to(torch.float32 if t.dtype == torch.float64 else torch.float64)

    return [
        BadInput(f"state[{i}] in {bad.dtype}", ("initial_state", str(t.dtype), str(bad.dtype)), state=bad_state)
        for i, t, bad, bad_state in each_state_tensor(state, other)
    ]


def standard_bad_inputs(inputs: OpInputs, state: Any, layout: str | None = None) -> list[BadInput]:
    """What every op must reject: an unknown mode, chunk size 0, a sequence input of the wrong rank, and a state
    of another batch size or dtype (for each of its tensors); see the ``bad_*`` functions for the messages."""
    return [
        *bad_modes(),
        *bad_chunk_sizes(),
        *bad_ranks(inputs, layout),
        *bad_state_batches(state),
        *bad_state_dtypes(state),
    ]


def core_bad_inputs(inputs: OpInputs, state: Any) -> list[BadInput]:
    """``standard_bad_inputs`` with the ``[B, T, H, D]`` layout the core ops name in their messages."""
    return standard_bad_inputs(inputs, state, layout="[B, T, H, D]")


def replace_state_tensors(state: Any, tensors: list[Tensor]) -> Any:
    """A state of the same structure as ``state`` (a tensor, a NamedTuple or a tuple) holding ``tensors`` in
    place of its ``raw_state_tensors`` (its ``None`` fields stay ``None``)."""
    if isinstance(state, Tensor):
        return tensors[0]
    remaining = iter(tensors)
    items = [None if t is None else next(remaining) for t in state]
    return type(state)._make(items) if hasattr(type(state), "_make") else tuple(items)


def abs_state(state: Any) -> Any:
    """The state with every tensor replaced by its absolute value."""
    return None if state is None else replace_state_tensors(state, [t.abs() for t in raw_state_tensors(state)])


def _registered_specs() -> dict[str, OpSpec]:
    """The spec of every registered op that names one (``Op.testing``), built-in or a plugin's."""
    from mixers.registry import get_registry

    specs = {}
    for name, op in sorted(get_registry().ops.items()):
        if op.testing is not None:
            specs[name] = op.load_testing()
    return specs


def __getattr__(name: str) -> Any:
    if name == "OP_SPECS":  # built when asked for: it imports every op's hypothesis cases
        return _registered_specs()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def get_op_spec(op: str | OpSpec) -> OpSpec:
    """``op`` itself if it is an ``OpSpec``, else the registered op's spec (``Op.testing``); an unknown name
    lists the known ones."""
    if isinstance(op, OpSpec):
        return op
    from mixers.registry import get_registry

    registered = get_registry().ops.get(op)
    if registered is None or registered.testing is None:
        known = sorted(name for name, o in get_registry().ops.items() if o.testing is not None)
        raise ValueError(
            f"the kit has no spec for op {op!r} (it knows {known}); for an op of your own, register an "
            f"mixers.ops.Op with testing='module:SPEC', or pass a mixers.testing.OpSpec instead of its name"
        )
    return registered.load_testing()
