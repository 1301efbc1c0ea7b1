"""The ``retention`` op for the conformance kit: hypothesis cases and the ``OpSpec`` (``SPEC``) that
``mixers.testing.check_op_backend`` checks any backend of the op against (needs ``seqmixers[testing]``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from hypothesis import strategies as st
from torch import Tensor

from mixers import functional
from mixers.ops.checks import state_dtype
from mixers.ops.retention.reference import retention_reference
from mixers.testing.ops import OpSpec, core_bad_inputs
from mixers.testing.strategies import ELEMENT_BUDGET, OpInputs, as_input, chunk_sizes, gamma_values, generator


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
        gen = generator(self.seed)
        scale = self.Dk**-0.25  # q . k of order 1, as after the mixer's key scaling
        q = torch.randn(self.B, self.T, self.H, self.Dk, generator=gen, dtype=torch.float64) * scale
        k = torch.randn(self.B, self.T, self.H, self.Dk, generator=gen, dtype=torch.float64) * scale
        v = torch.randn(self.B, self.T, self.H, self.Dv, generator=gen, dtype=torch.float64)
        s0 = torch.randn(self.B, self.H, self.Dk, self.Dv, generator=gen, dtype=torch.float64)
        q, k, v = (as_input(t, self.dtype, device, requires_grad) for t in (q, k, v))
        if not self.with_state:
            return q, k, v, None
        return q, k, v, as_input(s0, state_dtype(self.dtype), device, requires_grad)

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


SPEC = OpSpec(
    "retention",
    _retention_cases,
    _retention_call,
    _retention_reference,
    _retention_magnitude,
    bad_inputs=core_bad_inputs,
)
