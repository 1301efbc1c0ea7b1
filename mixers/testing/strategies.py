"""Hypothesis strategies for the conformance kit: shapes, chunk sizes, decays, states, split plans and inputs.

The kit's checks are built from these, and so can a plugin author's own property tests: docs/testing-api.md
documents every name here, with an example test. Each op's own cases live in its folder
(``mixers/ops/<op>/testing.py``: ``RetentionCase`` / ``retention_cases`` and the others), built from these.

Tensors are generated from a drawn seed (hypothesis draws the sizes, decays, chunk sizes and the seed;
torch draws the numbers), which keeps example generation cheap at T = 300 and D = 64, and keeps a
falsifying example short enough to read: ``RetentionCase(B=1, T=3, H=1, Dk=1, Dv=1, ..., seed=0)``.

Each ``*Case`` makes the inputs of one op as an ``OpInputs``: the tensors with time on dimension 1
(``seq``, sliced when a sequence is split), the other arguments (``const``) and the initial state.

A plan (``Plan``) runs a sequence of T tokens as segments with the state handed over: one
``(start, stop, mode, chunk_size)`` per segment, in order, covering ``0 .. T``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from hypothesis import settings
from hypothesis import strategies as st
from torch import Tensor

from mixers.ops.checks import MODES

__all__ = [
    "ELEMENT_BUDGET",
    "MODES",
    "OpInputs",
    "Plan",
    "as_input",
    "chunk_sizes",
    "gamma_values",
    "generator",
    "handover_plans",
    "mixer_split_plans",
    "scaled_examples",
    "segments",
    "splits",
]

# B * H * T * Dk * Dv above this draws a shorter T: chunk size 1 materialises one state per token.
ELEMENT_BUDGET = 3_000_000


def scaled_examples(fraction: float, minimum: int = 5) -> int:
    """A share of the loaded profile's ``max_examples``, at least ``minimum``, for tests whose single example is
    costly: ``@settings(max_examples=scaled_examples(0.2))``."""
    return max(minimum, int(settings.default.max_examples * fraction))


# Decays in (0, 1]: exactly 1 (no decay), the long-context 1 - 2**-12, values near 0 (1e-300 underflows any
# power), and any float in [1e-30, 1e-3] and [1e-6, 1]. One per head: st.lists(gamma_values, min_size=H, max_size=H).
gamma_values = st.one_of(
    st.just(1.0),
    st.sampled_from([1 - 2**-12, 1 - 2**-5, 0.5, 1e-3, 1e-12, 1e-300]),
    st.floats(min_value=1e-30, max_value=1e-3, allow_nan=False, allow_infinity=False, allow_subnormal=False),
    st.floats(min_value=1e-6, max_value=1.0, allow_nan=False, allow_infinity=False, allow_subnormal=False),
)


def chunk_sizes(T: int, extra: int = 5) -> st.SearchStrategy[int]:
    """Chunk sizes 1 to ``T + extra`` for a sequence of T tokens: ones that divide T, that don't, equal to T and
    larger than T."""
    return st.integers(1, max(1, T + extra))


@dataclass
class OpInputs:
    """One op call's inputs: ``seq`` tensors have time on dimension 1; ``const`` is passed as it is."""

    seq: dict[str, Tensor]
    const: dict[str, Any] = field(default_factory=dict)
    state: Any = None

    def named_leaves(self) -> list[tuple[str, Tensor]]:
        """What gradients are taken with respect to: ``seq``, tensors in ``const`` that require a gradient
        (a convolution's weight, say; not retention's constant decays) and the state's floating-point tensors
        (not a cache's integer lengths)."""
        state = () if self.state is None else (self.state,) if isinstance(self.state, Tensor) else tuple(self.state)
        return [
            *self.seq.items(),
            *((n, t) for n, t in self.const.items() if isinstance(t, Tensor) and t.requires_grad),
            *((f"state[{i}]", t) for i, t in enumerate(state) if isinstance(t, Tensor) and t.is_floating_point()),
        ]


def generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with a drawn ``seed``: cases draw their numbers from it (hypothesis draws the seed)."""
    return torch.Generator().manual_seed(seed)


def as_input(t: Tensor, dtype: torch.dtype, device: torch.device | str | None, requires_grad: bool) -> Tensor:
    """``t`` (drawn in float64 on the CPU) as an op input: on ``device``, in ``dtype``, a leaf for gradients."""
    return t.to(device=device, dtype=dtype).requires_grad_(requires_grad)


@st.composite
def splits(draw: st.DrawFn, T: int, max_cuts: int = 3) -> list[int]:
    """1 to ``max_cuts`` sorted cut points ``0 <= c <= T`` (repeats allowed: empty segments are a legal call);
    ``segments(T, cuts)`` turns them into segments."""
    cuts = draw(st.lists(st.integers(0, T), min_size=1, max_size=max_cuts))
    return sorted(cuts)


def segments(T: int, cuts: list[int]) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` covering ``0 .. T`` at the cut points (a plain function, not a strategy):
    ``segments(10, [3, 3, 7]) == [(0, 3), (3, 3), (3, 7), (7, 10)]``."""
    bounds = [0, *cuts, T]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


Plan = list[tuple[int, int, str, int]]  # (start, stop, mode, chunk size) per segment, in order, covering 0 .. T


@st.composite
def handover_plans(draw: st.DrawFn, cases: st.SearchStrategy[Any], modes: tuple[str, ...] = MODES) -> tuple[Any, Plan]:
    """``(case, plan)``: a case drawn from ``cases`` (anything with ``T``) and a ``Plan`` over ``0 .. case.T``
    from ``splits``: segments (possibly empty), each in a mode from ``modes`` and a chunk size 1 to its length + 5."""
    case = draw(cases)
    plan = [
        (start, stop, draw(st.sampled_from(modes)), draw(st.integers(1, stop - start + 5)))
        for start, stop in segments(case.T, draw(splits(case.T)))
    ]
    return case, plan


@st.composite
def mixer_split_plans(draw: st.DrawFn, max_T: int = 24, modes: tuple[str, ...] = MODES) -> tuple[int, Plan]:
    """``(T, plan)``: a length 1 to ``max_T`` and a ``Plan`` of non-empty segments (at most 3 cuts), each in a mode
    from ``modes`` and a chunk size 1 to its length + 3, for ``mixers.testing.run_split(mixer, x, plan)``."""
    T = draw(st.integers(1, max_T))
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, T - 1)), max_size=3)))) if T > 1 else []
    return T, [
        (start, stop, draw(st.sampled_from(modes)), draw(st.integers(1, stop - start + 3)))
        for start, stop in segments(T, cuts)
    ]
