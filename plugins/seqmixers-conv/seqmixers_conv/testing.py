"""The ``short_conv`` op described for the seqmixers conformance kit (needs ``seqmixers[testing]``).

``SHORT_CONV_SPEC`` is what ``mixers.testing.check_op_backend`` needs to check any backend of the op:
cases, how to call it, and a float64 reference written from the formula.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from hypothesis import strategies as st
from mixers.testing import OpInputs, OpSpec
from mixers.testing.strategies import chunk_sizes
from torch import Tensor

from seqmixers_conv.op import OP, short_conv


def short_conv_reference(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, initial_state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``y_t[c] = bias[c] + sum_j weight[c, j] x_{t-K+1+j}[c]`` as a literal sum over the taps, in float64."""
    x, w = x.double(), weight.double()
    B, T, C = x.shape
    K = w.shape[1]
    before = x.new_zeros(B, K - 1, C) if initial_state is None else initial_state.double()
    padded = torch.cat([before, x], dim=1)  # position t of x is padded[t + K - 1]
    y = sum(w[:, j] * padded[:, j : j + T] for j in range(K))
    if bias is not None:
        y = y + bias.double()
    return y, padded[:, T:]


@dataclass(frozen=True)
class ShortConvCase:
    """One example: ``x [B, T, C]``, ``K`` taps, an optional bias and an optional window of earlier inputs."""

    B: int
    T: int
    C: int
    K: int
    with_bias: bool
    chunk_size: int
    with_state: bool
    seed: int
    dtype: torch.dtype = torch.float64

    def inputs(self, requires_grad: bool = False, device: torch.device | str | None = None) -> OpInputs:
        gen = torch.Generator().manual_seed(self.seed)

        def randn(*shape: int) -> Tensor:
            t = torch.randn(*shape, generator=gen, dtype=torch.float64)
            return t.to(device=device, dtype=self.dtype).requires_grad_(requires_grad)

        x, weight, bias, window = randn(self.B, self.T, self.C), randn(self.C, self.K), randn(self.C), None
        if self.with_state:
            window = randn(self.B, self.K - 1, self.C)
        return OpInputs({"x": x}, {"weight": weight, "bias": bias if self.with_bias else None}, window)


@st.composite
def short_conv_cases(
    draw: st.DrawFn, *, dtypes: tuple[torch.dtype, ...] = (torch.float64,), max_T: int = 40, max_C: int = 8
) -> ShortConvCase:
    """B 1-3, T 1-``max_T``, C 1-``max_C``, K 1-6, chunk sizes 1 to T + 5."""
    T = draw(st.integers(1, max_T))
    return ShortConvCase(
        B=draw(st.integers(1, 3)),
        T=T,
        C=draw(st.integers(1, max_C)),
        K=draw(st.integers(1, 6)),
        with_bias=draw(st.booleans()),
        chunk_size=draw(chunk_sizes(T)),
        with_state=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
        dtype=draw(st.sampled_from(dtypes)),
    )


def _call(seq: dict[str, Tensor], const: dict[str, Any], state: Any, *, mode, chunk_size, backend):
    return short_conv(
        seq["x"], const["weight"], const["bias"], mode=mode, chunk_size=chunk_size, initial_state=state,
        backend=backend,
    )  # fmt: skip


def _reference(x: OpInputs) -> tuple[Tensor, Tensor]:
    return short_conv_reference(x.seq["x"], x.const["weight"], x.const["bias"], x.state)


def _magnitude(x: OpInputs) -> tuple[Tensor, Tensor]:
    bias = x.const["bias"]
    state = None if x.state is None else x.state.abs()
    return short_conv_reference(x.seq["x"].abs(), x.const["weight"].abs(), None if bias is None else bias.abs(), state)


SHORT_CONV_SPEC = OpSpec(
    op=OP,
    cases=short_conv_cases,
    call=_call,
    reference=_reference,
    magnitude=_magnitude,
    state_dtype=lambda dtype: dtype,  # the window holds the inputs as they came
)
