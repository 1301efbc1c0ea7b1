"""What the kit needs to know about an op to check a backend of it: ``OpSpec``.

The three core ops have specs here (``OP_SPECS``). A plugin that brings an op of its own describes it
with an ``OpSpec`` of its own (cases, how to call the op, a float64 reference) and passes that to
``mixers.testing.check_op_backend``; see ``docs/plugins.md``.

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

from mixers import functional
from mixers.testing.reference import linear_attention_reference, retention_reference, softmax_attention_reference
from mixers.testing.strategies import OpInputs, linear_attention_cases, retention_cases, softmax_attention_cases


def state_tensors(state: Any) -> tuple[Tensor, ...]:
    """An op's state as a tuple of tensors: ``None`` -> ``()``, a tensor -> ``(t,)``, a tuple -> itself."""
    if state is None:
        return ()
    if isinstance(state, Tensor):
        return (state,)
    return tuple(state)


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
    state_dtype: Callable[[torch.dtype], torch.dtype] = functional.state_dtype
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


def _each_state_tensor(state: Any, change: Callable[[Tensor], Tensor]) -> list[tuple[int, Tensor, Tensor, Any]]:
    """``(i, tensor, changed, state with only tensor i changed)`` for each tensor of ``state``."""
    tensors = state_tensors(state)
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
        for i, t, bad, bad_state in _each_state_tensor(state, lambda t: torch.cat([t, t[:1]]))
    ]


def bad_state_dtypes(state: Any) -> list[BadInput]:
    """Each state tensor in another dtype: the message names initial_state, the dtype it must have and the one
    it got."""

    def other(t: Tensor) -> Tensor:
        return t.to(torch.float32 if t.dtype == torch.float64 else torch.float64)

    return [
        BadInput(f"state[{i}] in {bad.dtype}", ("initial_state", str(t.dtype), str(bad.dtype)), state=bad_state)
        for i, t, bad, bad_state in _each_state_tensor(state, other)
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


def _core_bad_inputs(inputs: OpInputs, state: Any) -> list[BadInput]:
    return standard_bad_inputs(inputs, state, layout="[B, T, H, D]")


def replace_state_tensors(state: Any, tensors: list[Tensor]) -> Any:
    """A state of the same structure as ``state`` (a tensor, a NamedTuple or a tuple) holding ``tensors``."""
    if isinstance(state, Tensor):
        return tensors[0]
    return type(state)._make(tensors) if hasattr(type(state), "_make") else tuple(tensors)


def _abs(state: Any) -> Any:
    """The state with every tensor replaced by its absolute value."""
    return None if state is None else replace_state_tensors(state, [t.abs() for t in state_tensors(state)])


# -- retention ---------------------------------------------------------------------------------------
def _retention_call(seq, const, state, *, mode, chunk_size, backend):
    return functional.retention(
        seq["q"], seq["k"], seq["v"], const["gamma"], mode=mode, chunk_size=chunk_size, initial_state=state,
        backend=backend,
    )  # fmt: skip


def _gammas(x: OpInputs) -> Tensor:
    return torch.tensor(x.const["gamma"], dtype=torch.float64)


def _retention_reference(x: OpInputs) -> tuple[Tensor, Tensor]:
    return retention_reference(x.seq["q"], x.seq["k"], x.seq["v"], _gammas(x), x.state)


def _retention_magnitude(x: OpInputs) -> tuple[Tensor, Tensor]:
    q, k, v = (x.seq[n].abs() for n in "qkv")
    return retention_reference(q, k, v, _gammas(x), None if x.state is None else x.state.abs())


def _retention_cases(*, dtypes=(torch.float64,), max_T: int = 64, max_D: int = 16) -> st.SearchStrategy[Any]:
    return retention_cases(dtypes=dtypes, max_T=max_T, max_D=max_D)


# -- linear attention --------------------------------------------------------------------------------
def _linear_call(seq, const, state, *, mode, chunk_size, backend):
    return functional.linear_attention(
        seq["q"], seq["k"], seq["v"], mode=mode, chunk_size=chunk_size, initial_state=state,
        normalize=const["normalize"], backend=backend,
    )  # fmt: skip


def _linear_reference(x: OpInputs):
    return linear_attention_reference(x.seq["q"], x.seq["k"], x.seq["v"], x.state, normalize=x.const["normalize"])


def _linear_magnitude(x: OpInputs):
    q, k, v = x.seq["q"], x.seq["k"], x.seq["v"]
    if x.const["normalize"]:  # a weighted mean of values with positive weights: errors scale with |v|
        return linear_attention_reference(q, k, v.abs(), _abs(x.state), normalize=True)
    return linear_attention_reference(q.abs(), k.abs(), v.abs(), _abs(x.state), normalize=False)


def _linear_cases(*, dtypes=(torch.float64,), max_T: int = 40, max_D: int = 8) -> st.SearchStrategy[Any]:
    return linear_attention_cases(dtypes=dtypes, max_T=max_T, max_D=max_D)


# -- softmax attention -------------------------------------------------------------------------------
def _softmax_call(seq, const, state, *, mode, chunk_size, backend):
    return functional.softmax_attention(
        seq["q"], seq["k"], seq["v"], mode=mode, chunk_size=chunk_size, initial_state=state, backend=backend
    )


def _softmax_reference(x: OpInputs):
    return softmax_attention_reference(x.seq["q"], x.seq["k"], x.seq["v"], x.state)


def _softmax_magnitude(x: OpInputs):  # softmax weights are positive: errors scale with |v|
    state = None if x.state is None else (x.state[0], x.state[1].abs())
    return softmax_attention_reference(x.seq["q"], x.seq["k"], x.seq["v"].abs(), state)


def _softmax_bad_inputs(inputs: OpInputs, state: Any) -> list[BadInput]:
    """The standard cases, but a KV cache of another batch size is reported by batch size, not by shape."""
    B = inputs.seq["q"].shape[0]
    cache_batches = [
        BadInput(
            f"state[{i}] for another batch size", ("initial_state", f"batch size {B + 1}", f"batch size {B}"), state=bad
        )
        for i, _, _, bad in _each_state_tensor(state, lambda t: torch.cat([t, t[:1]]))
    ]
    return [
        *bad_modes(),
        *bad_chunk_sizes(),
        *bad_ranks(inputs, "[B, T, H, D]"),
        *cache_batches,
        *bad_state_dtypes(state),
    ]


def _softmax_cases(*, dtypes=(torch.float64,), max_T: int = 24, max_D: int = 8) -> st.SearchStrategy[Any]:
    return softmax_attention_cases(dtypes=dtypes, max_T=max_T, max_D=max_D)


OP_SPECS: dict[str, OpSpec] = {
    "retention": OpSpec(
        "retention",
        _retention_cases,
        _retention_call,
        _retention_reference,
        _retention_magnitude,
        bad_inputs=_core_bad_inputs,
    ),
    "linear_attention": OpSpec(
        "linear_attention",
        _linear_cases,
        _linear_call,
        _linear_reference,
        _linear_magnitude,
        bad_inputs=_core_bad_inputs,
    ),
    "softmax_attention": OpSpec(
        "softmax_attention",
        _softmax_cases,
        _softmax_call,
        _softmax_reference,
        _softmax_magnitude,
        state_dtype=lambda dtype: dtype,  # the cache stores keys and values as they came
        bad_inputs=_softmax_bad_inputs,
    ),
}


def get_op_spec(op: str | OpSpec) -> OpSpec:
    """``op`` itself if it is an ``OpSpec``, else the core op's spec; an unknown name lists the known ones."""
    if isinstance(op, OpSpec):
        return op
    if op not in OP_SPECS:
        raise ValueError(
            f"the kit has no spec for op {op!r} (it knows {sorted(OP_SPECS)}); for an op of your own, "
            f"pass a mixers.testing.OpSpec instead of its name"
        )
    return OP_SPECS[op]
