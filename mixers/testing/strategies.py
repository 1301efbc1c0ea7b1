"""Hypothesis strategies for the conformance kit: shapes, chunk sizes, decays, states, split plans and inputs.

Tensors are generated from a drawn seed (hypothesis draws the sizes, decays, chunk sizes and the seed;
torch draws the numbers), which keeps example generation cheap at T = 300 and D = 64, and keeps a
falsifying example short enough to read: ``RetentionCase(B=1, T=3, H=1, Dk=1, Dv=1, ..., seed=0)``.

Each ``*Case`` makes the inputs of one op as an ``OpInputs``: the tensors with time on dimension 1
(``seq``, sliced when a sequence is split), the other arguments (``const``) and the initial state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from hypothesis import settings
from hypothesis import strategies as st
from torch import Tensor

from mixers.functional import MODES, KVCache, LinearState, state_dtype

__all__ = [
    "ELEMENT_BUDGET",
    "MODES",
    "LinearAttentionCase",
    "OpInputs",
    "Plan",
    "RetentionCase",
    "SoftmaxAttentionCase",
    "chunk_sizes",
    "gamma_values",
    "handover_plans",
    "linear_attention_cases",
    "mixer_split_plans",
    "retention_cases",
    "scaled_examples",
    "segments",
    "softmax_attention_cases",
    "splits",
]

# B * H * T * Dk * Dv above this draws a shorter T: chunk size 1 materialises one state per token.
ELEMENT_BUDGET = 3_000_000


def scaled_examples(fraction: float, minimum: int = 5) -> int:
    """A share of the loaded profile's ``max_examples`` (for tests whose single example is costly)."""
    return max(minimum, int(settings.default.max_examples * fraction))


# Decays in (0, 1]: exactly 1 (no decay), the long-context value, values near 0, and anything between.
gamma_values = st.one_of(
    st.just(1.0),
    st.sampled_from([1 - 2**-12, 1 - 2**-5, 0.5, 1e-3, 1e-12, 1e-300]),
    st.floats(min_value=1e-30, max_value=1e-3, allow_nan=False, allow_infinity=False, allow_subnormal=False),
    st.floats(min_value=1e-6, max_value=1.0, allow_nan=False, allow_infinity=False, allow_subnormal=False),
)


def chunk_sizes(T: int, extra: int = 5) -> st.SearchStrategy[int]:
    """Chunk sizes 1 to ``T + extra``: ones that divide T, that don't, equal to T and larger than T."""
    return st.integers(1, max(1, T + extra))


@dataclass
class OpInputs:
    """One op call's inputs: ``seq`` tensors have time on dimension 1; ``const`` is passed as it is."""

    seq: dict[str, Tensor]
    const: dict[str, Any] = field(default_factory=dict)
    state: Any = None

    def named_leaves(self) -> list[tuple[str, Tensor]]:
        """What gradients are taken with respect to: ``seq``, tensors in ``const`` that require a gradient
        (a convolution's weight, say; not retention's constant decays) and the state's tensors."""
        state = () if self.state is None else (self.state,) if isinstance(self.state, Tensor) else tuple(self.state)
        return [
            *self.seq.items(),
            *((n, t) for n, t in self.const.items() if isinstance(t, Tensor) and t.requires_grad),
            *((f"state[{i}]", t) for i, t in enumerate(state) if isinstance(t, Tensor)),
        ]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _to(t: Tensor, dtype: torch.dtype, device: torch.device | str | None, requires_grad: bool) -> Tensor:
    return t.to(device=device, dtype=dtype).requires_grad_(requires_grad)


@dataclass(frozen=True)
class RetentionCase:
    """Sizes, decays, chunk size and seed of one retention example; ``tensors()`` makes its inputs."""

    B: int
    T: int
    H: int
    Dk: int
    Dv: int
    gamma: tuple[float, ...]
    chunk_size: int
    with_state: bool
    seed: int
    dtype: torch.dtype = torch.float64

    def tensors(
        self, requires_grad: bool = False, device: torch.device | str | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """``q, k, v [B, T, H, D]`` of ``dtype`` and an initial state (or ``None``) in the state dtype."""
        gen = _gen(self.seed)
        scale = self.Dk**-0.25  # q . k of order 1, as after the mixer's key scaling
        q = torch.randn(self.B, self.T, self.H, self.Dk, generator=gen, dtype=torch.float64) * scale
        k = torch.randn(self.B, self.T, self.H, self.Dk, generator=gen, dtype=torch.float64) * scale
        v = torch.randn(self.B, self.T, self.H, self.Dv, generator=gen, dtype=torch.float64)
        s0 = torch.randn(self.B, self.H, self.Dk, self.Dv, generator=gen, dtype=torch.float64)
        q, k, v = (_to(t, self.dtype, device, requires_grad) for t in (q, k, v))
        if not self.with_state:
            return q, k, v, None
        return q, k, v, _to(s0, state_dtype(self.dtype), device, requires_grad)

    def inputs(self, requires_grad: bool = False, device: torch.device | str | None = None) -> OpInputs:
        q, k, v, s0 = self.tensors(requires_grad, device)
        return OpInputs({"q": q, "k": k, "v": v}, {"gamma": list(self.gamma)}, s0)

    @property
    def gamma_tensor(self) -> Tensor:
        return torch.tensor(self.gamma, dtype=torch.float64)


@st.composite
def retention_cases(
    draw: st.DrawFn,
    *,
    max_T: int = 300,
    max_D: int = 64,
    dtypes: tuple[torch.dtype, ...] = (torch.float64,),
    budget: int = ELEMENT_BUDGET,
) -> RetentionCase:
    """B 1-3, H 1-4, Dk, Dv 1-``max_D``, T 1-``max_T`` (shorter when B * H * T * Dk * Dv would pass
    ``budget``), chunk size 1 to T + 5."""
    B = draw(st.integers(1, 3))
    H = draw(st.integers(1, 4))
    Dk = draw(st.integers(1, max_D))
    Dv = draw(st.integers(1, max_D))
    T = draw(st.integers(1, max(1, min(max_T, budget // (B * H * Dk * Dv)))))
    return RetentionCase(
        B=B,
        T=T,
        H=H,
        Dk=Dk,
        Dv=Dv,
        gamma=tuple(draw(st.lists(gamma_values, min_size=H, max_size=H))),
        chunk_size=draw(chunk_sizes(T)),
        with_state=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
        dtype=draw(st.sampled_from(dtypes)),
    )


@dataclass(frozen=True)
class LinearAttentionCase:
    """One linear-attention example. With ``normalize`` the features are positive (``elu + 1``) and the
    state non-negative, which keeps the normaliser away from the guard, where the op is ill-conditioned."""

    B: int
    T: int
    H: int
    Dk: int
    Dv: int
    normalize: bool
    chunk_size: int
    with_state: bool
    seed: int
    dtype: torch.dtype = torch.float64

    def inputs(self, requires_grad: bool = False, device: torch.device | str | None = None) -> OpInputs:
        gen = _gen(self.seed)
        B, T, H, Dk, Dv = self.B, self.T, self.H, self.Dk, self.Dv
        q, k = (torch.randn(B, T, H, Dk, generator=gen, dtype=torch.float64) for _ in range(2))
        if self.normalize:
            q, k = F.elu(q) + 1, F.elu(k) + 1
        v = torch.randn(B, T, H, Dv, generator=gen, dtype=torch.float64)
        kv0 = torch.rand(B, H, Dk, Dv, generator=gen, dtype=torch.float64)
        z0 = torch.rand(B, H, Dk, generator=gen, dtype=torch.float64)
        if not self.normalize:
            kv0 = kv0 * 2 - 1
        seq = {name: _to(t, self.dtype, device, requires_grad) for name, t in (("q", q), ("k", k), ("v", v))}
        state = None
        if self.with_state:
            sd = state_dtype(self.dtype)
            state = LinearState(_to(kv0, sd, device, requires_grad), _to(z0, sd, device, requires_grad))
        return OpInputs(seq, {"normalize": self.normalize}, state)


@st.composite
def linear_attention_cases(
    draw: st.DrawFn, *, max_T: int = 40, max_D: int = 8, dtypes: tuple[torch.dtype, ...] = (torch.float64,)
) -> LinearAttentionCase:
    """B 1-2, H 1-3, Dk, Dv 1-``max_D``, T 1-``max_T``, either normalisation, chunk size 1 to T + 5."""
    T = draw(st.integers(1, max_T))
    return LinearAttentionCase(
        B=draw(st.integers(1, 2)),
        T=T,
        H=draw(st.integers(1, 3)),
        Dk=draw(st.integers(1, max_D)),
        Dv=draw(st.integers(1, max_D)),
        normalize=draw(st.booleans()),
        chunk_size=draw(chunk_sizes(T)),
        with_state=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
        dtype=draw(st.sampled_from(dtypes)),
    )


@dataclass(frozen=True)
class SoftmaxAttentionCase:
    """One softmax-attention example: ``H = Hkv * groups`` query heads, and a KV cache of ``Tc`` tokens."""

    B: int
    T: int
    Hkv: int
    groups: int
    Dk: int
    Dv: int
    Tc: int
    chunk_size: int
    with_state: bool
    seed: int
    dtype: torch.dtype = torch.float64

    def inputs(self, requires_grad: bool = False, device: torch.device | str | None = None) -> OpInputs:
        gen = _gen(self.seed)
        B, T, Hkv, Dk, Dv, Tc = self.B, self.T, self.Hkv, self.Dk, self.Dv, self.Tc

        def randn(*shape: int) -> Tensor:
            return _to(torch.randn(*shape, generator=gen, dtype=torch.float64), self.dtype, device, requires_grad)

        q, k, v = randn(B, T, Hkv * self.groups, Dk), randn(B, T, Hkv, Dk), randn(B, T, Hkv, Dv)
        cache = KVCache(randn(B, Tc, Hkv, Dk), randn(B, Tc, Hkv, Dv)) if self.with_state else None
        return OpInputs({"q": q, "k": k, "v": v}, {}, cache)


@st.composite
def softmax_attention_cases(
    draw: st.DrawFn, *, max_T: int = 24, max_D: int = 8, dtypes: tuple[torch.dtype, ...] = (torch.float64,)
) -> SoftmaxAttentionCase:
    """B 1-2, Hkv 1-2 with 1-3 query heads each, Dk, Dv 1-``max_D``, T 1-``max_T``, a cache of 0-8 tokens."""
    T = draw(st.integers(1, max_T))
    return SoftmaxAttentionCase(
        B=draw(st.integers(1, 2)),
        T=T,
        Hkv=draw(st.integers(1, 2)),
        groups=draw(st.integers(1, 3)),
        Dk=draw(st.integers(1, max_D)),
        Dv=draw(st.integers(1, max_D)),
        Tc=draw(st.integers(0, 8)),
        chunk_size=draw(chunk_sizes(T)),
        with_state=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
        dtype=draw(st.sampled_from(dtypes)),
    )


@st.composite
def splits(draw: st.DrawFn, T: int, max_cuts: int = 3) -> list[int]:
    """Sorted cut points ``0 <= c <= T`` (repeats allowed: empty segments are a legal call)."""
    cuts = draw(st.lists(st.integers(0, T), min_size=1, max_size=max_cuts))
    return sorted(cuts)


def segments(T: int, cuts: list[int]) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` covering ``0 .. T`` at the cut points."""
    bounds = [0, *cuts, T]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


Plan = list[tuple[int, int, str, int]]  # (start, stop, mode, chunk size) per segment


@st.composite
def handover_plans(draw: st.DrawFn, cases: st.SearchStrategy[Any], modes: tuple[str, ...] = MODES) -> tuple[Any, Plan]:
    """A case (anything with ``T``) and a split of ``0..T`` into segments, each in a drawn mode and chunk size."""
    case = draw(cases)
    plan = [
        (start, stop, draw(st.sampled_from(modes)), draw(st.integers(1, stop - start + 5)))
        for start, stop in segments(case.T, draw(splits(case.T)))
    ]
    return case, plan


@st.composite
def mixer_split_plans(draw: st.DrawFn, max_T: int = 24, modes: tuple[str, ...] = MODES) -> tuple[int, Plan]:
    """``(T, plan)``: a length and a split into non-empty segments, each in a drawn mode and chunk size."""
    T = draw(st.integers(1, max_T))
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, T - 1)), max_size=3)))) if T > 1 else []
    return T, [
        (start, stop, draw(st.sampled_from(modes)), draw(st.integers(1, stop - start + 3)))
        for start, stop in segments(T, cuts)
    ]
