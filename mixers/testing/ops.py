"""What the kit needs to know about an op to check a backend of it: ``OpSpec``.

The three core ops have specs here (``OP_SPECS``). A plugin that brings an op of its own describes it
with an ``OpSpec`` of its own (cases, how to call the op, a float64 reference) and passes that to
``mixers.testing.check_op_backend``; see ``docs/plugins.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
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
    """

    op: str
    cases: Callable[..., st.SearchStrategy[Any]]
    call: Callable[..., tuple[Tensor, Any]]
    reference: Callable[[OpInputs], tuple[Tensor, Any]]
    magnitude: Callable[[OpInputs], tuple[Tensor, Any]] | None = None
    state_dtype: Callable[[torch.dtype], torch.dtype] = functional.state_dtype


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


def _softmax_cases(*, dtypes=(torch.float64,), max_T: int = 24, max_D: int = 8) -> st.SearchStrategy[Any]:
    return softmax_attention_cases(dtypes=dtypes, max_T=max_T, max_D=max_D)


OP_SPECS: dict[str, OpSpec] = {
    "retention": OpSpec("retention", _retention_cases, _retention_call, _retention_reference, _retention_magnitude),
    "linear_attention": OpSpec("linear_attention", _linear_cases, _linear_call, _linear_reference, _linear_magnitude),
    "softmax_attention": OpSpec(
        "softmax_attention",
        _softmax_cases,
        _softmax_call,
        _softmax_reference,
        _softmax_magnitude,
        state_dtype=lambda dtype: dtype,  # the cache stores keys and values as they came
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
