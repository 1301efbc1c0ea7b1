"""Shared hypothesis strategies and numerical helpers for the retention and mixer tests.

Tensors are generated from a drawn seed (hypothesis draws the sizes, decays, chunk sizes and the seed;
torch draws the numbers), which keeps example generation cheap at T = 300 and D = 64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import settings
from hypothesis import strategies as st
from torch import Tensor

MODES = ("parallel", "chunkwise", "recurrent")

# Relative tolerances (max abs error / max abs of the reference) per dtype of the computation.
RTOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 2e-2}

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

    def tensors(self, requires_grad: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """``q, k, v [B, T, H, D]`` of ``dtype`` and an initial state (or ``None``) in the state dtype."""
        gen = torch.Generator().manual_seed(self.seed)
        scale = self.Dk**-0.25  # q . k of order 1, as after the mixer's key scaling
        q = torch.randn(self.B, self.T, self.H, self.Dk, generator=gen, dtype=torch.float64) * scale
        k = torch.randn(self.B, self.T, self.H, self.Dk, generator=gen, dtype=torch.float64) * scale
        v = torch.randn(self.B, self.T, self.H, self.Dv, generator=gen, dtype=torch.float64)
        s0 = torch.randn(self.B, self.H, self.Dk, self.Dv, generator=gen, dtype=torch.float64)
        q, k, v = (t.to(self.dtype).requires_grad_(requires_grad) for t in (q, k, v))
        if not self.with_state:
            return q, k, v, None
        s0 = s0.to(torch.promote_types(self.dtype, torch.float32)).requires_grad_(requires_grad)
        return q, k, v, s0

    @property
    def gamma_tensor(self) -> Tensor:
        return torch.tensor(self.gamma, dtype=torch.float64)


@st.composite
def retention_cases(
    draw, *, max_T: int = 300, dtypes: tuple[torch.dtype, ...] = (torch.float64,), budget: int = ELEMENT_BUDGET
) -> RetentionCase:
    """B 1-3, H 1-4, Dk, Dv 1-64, T 1-``max_T`` (shorter when B * H * T * Dk * Dv would pass ``budget``),
    chunk size 1 to T + 5."""
    B = draw(st.integers(1, 3))
    H = draw(st.integers(1, 4))
    Dk = draw(st.integers(1, 64))
    Dv = draw(st.integers(1, 64))
    T = draw(st.integers(1, max(1, min(max_T, budget // (B * H * Dk * Dv)))))
    return RetentionCase(
        B=B,
        T=T,
        H=H,
        Dk=Dk,
        Dv=Dv,
        gamma=tuple(draw(st.lists(gamma_values, min_size=H, max_size=H))),
        chunk_size=draw(st.integers(1, T + 5)),
        with_state=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
        dtype=draw(st.sampled_from(dtypes)),
    )


@st.composite
def splits(draw, T: int, max_cuts: int = 3) -> list[int]:
    """Sorted cut points ``0 <= c <= T`` (repeats allowed: empty segments are a legal call)."""
    cuts = draw(st.lists(st.integers(0, T), min_size=1, max_size=max_cuts))
    return sorted(cuts)


def segments(T: int, cuts: list[int]) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` covering ``0 .. T`` at the cut points."""
    bounds = [0, *cuts, T]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def max_rel_error(actual: Tensor, expected: Tensor, scale: Tensor | None = None) -> float:
    """``max |actual - expected| / max |scale|`` in float64; ``scale`` defaults to ``expected``.

    Pass as ``scale`` the same computation on absolute values (``sum |terms|``) where sums may cancel:
    rounding error is bounded relative to that, not to the (possibly tiny) result.
    """
    a, e = actual.detach().double(), expected.detach().double()
    if not e.numel():
        return 0.0
    s = e if scale is None else scale.detach().double()
    err = (a - e).abs().max().item()
    top = s.abs().max().item()
    return err / top if top > 0 else err


def norm_rel_error(actual: Tensor, expected: Tensor) -> float:
    """``||actual - expected|| / ||expected||`` in float64 (fla's measure for low-precision kernels)."""
    a, e = actual.detach().double(), expected.detach().double()
    scale = e.norm().item()
    err = (a - e).norm().item()
    return err / scale if scale > 0 else err


def assert_rel_close(
    actual: Tensor, expected: Tensor, rtol: float, what: str = "", scale: Tensor | None = None
) -> None:
    """Same shape, finite, and ``max_rel_error <= rtol``."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = max_rel_error(actual, expected, scale)
    assert err <= rtol, f"{what}: relative error {err:.3e} > {rtol:.1e}"
