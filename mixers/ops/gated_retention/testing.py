"""The ``gated_retention`` op for the conformance kit: hypothesis cases and the ``OpSpec`` (``SPEC``) that
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
from mixers.ops.gated_retention.reference import gated_retention_reference
from mixers.testing.ops import BadInput, OpSpec, bad_ranks, shape_str, standard_bad_inputs
from mixers.testing.strategies import ELEMENT_BUDGET, OpInputs, as_input, chunk_sizes, generator

# How the log decays of a case are drawn: none (g = 0), mild (-0.1..0, the long-memory heads), strong (-20..0 per
# token), mixed (per token: 0, mild, strong, and now and then -inf, a token that forgets the state).
DECAY_KINDS = ("none", "mild", "strong", "mixed")


def log_decays(kind: str, shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
    """Log decays ``g`` (float64, ``<= 0``) of one of ``DECAY_KINDS``."""
    u = torch.rand(shape, generator=gen, dtype=torch.float64)
    if kind == "none":
        return torch.zeros(shape, dtype=torch.float64)
    if kind == "mild":
        return -0.1 * u
    if kind == "strong":
        return -20.0 * u
    pick = torch.randint(0, 8, shape, generator=gen)
    g = torch.where(pick < 3, -0.05 * u, -5.0 * u)
    g = torch.where(pick == 5, torch.full_like(g, -20.0), g)
    g = torch.where(pick == 6, torch.zeros_like(g), g)
    return torch.where(pick == 7, torch.full_like(g, -torch.inf), g)


@dataclass(frozen=True)
class GatedRetentionCase:
    """Sizes, decay kind, chunk size and seed of one gated-retention example; ``inputs()`` makes them."""

    B: int
    T: int
    H: int
    Dk: int
    Dv: int
    decays: str
    chunk_size: int
    with_state: bool
    seed: int
    dtype: torch.dtype = torch.float64

    def inputs(self, requires_grad: bool = False, device: torch.device | str | None = None) -> OpInputs:
        gen = generator(self.seed)
        B, T, H, Dk, Dv = self.B, self.T, self.H, self.Dk, self.Dv
        scale = Dk**-0.25  # q . k of order 1, as after the mixer's key scaling
        q, k = (torch.randn(B, T, H, Dk, generator=gen, dtype=torch.float64) * scale for _ in range(2))
        v = torch.randn(B, T, H, Dv, generator=gen, dtype=torch.float64)
        g = log_decays(self.decays, (B, T, H), gen)
        s0 = torch.randn(B, H, Dk, Dv, generator=gen, dtype=torch.float64)
        seq = {n: as_input(t, self.dtype, device, requires_grad) for n, t in (("q", q), ("k", k), ("v", v), ("g", g))}
        state = as_input(s0, state_dtype(self.dtype), device, requires_grad) if self.with_state else None
        return OpInputs(seq, {}, state)


@st.composite
def gated_retention_cases(
    draw: st.DrawFn,
    *,
    max_T: int = 64,
    max_D: int = 16,
    dtypes: tuple[torch.dtype, ...] = (torch.float64,),
    budget: int = ELEMENT_BUDGET,
) -> GatedRetentionCase:
    """B 1-3, H 1-4, Dk, Dv 1-``max_D``, T 1-``max_T`` (within ``budget``), a decay kind, chunk size 1 to T + 5."""
    B = draw(st.integers(1, 3))
    H = draw(st.integers(1, 4))
    Dk = draw(st.integers(1, max_D))
    Dv = draw(st.integers(1, max_D))
    T = draw(st.integers(1, max(1, min(max_T, budget // (B * H * Dk * Dv)))))
    return GatedRetentionCase(
        B=B,
        T=T,
        H=H,
        Dk=Dk,
        Dv=Dv,
        decays=draw(st.sampled_from(DECAY_KINDS)),
        chunk_size=draw(chunk_sizes(T)),
        with_state=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
        dtype=draw(st.sampled_from(dtypes)),
    )


def _call(seq, const, state, *, mode, chunk_size, backend):
    return functional.gated_retention(
        seq["q"], seq["k"], seq["v"], seq["g"], mode=mode, chunk_size=chunk_size, initial_state=state, backend=backend
    )


def _reference(x: OpInputs) -> tuple[Tensor, Tensor]:
    return gated_retention_reference(x.seq["q"], x.seq["k"], x.seq["v"], x.seq["g"], x.state)


def _magnitude(x: OpInputs) -> tuple[Tensor, Tensor]:
    q, k, v = (x.seq[n].abs() for n in "qkv")
    return gated_retention_reference(q, k, v, x.seq["g"], None if x.state is None else x.state.abs())


def _bad_inputs(inputs: OpInputs, state: Any) -> list[BadInput]:
    """The core ops' bad inputs (q, k, v in ``[B, T, H, D]``), and log decays of the wrong rank, shape or dtype."""
    g = inputs.seq["g"]
    qkv = OpInputs({n: t for n, t in inputs.seq.items() if n != "g"}, inputs.const, inputs.state)
    return [
        *standard_bad_inputs(qkv, state, layout="[B, T, H, D]"),
        *bad_ranks(OpInputs({"g": g}), layout="[B, T, H]"),
        BadInput("g with a head too many", ("g", "[B, T, H]", shape_str(g[..., :1].repeat(1, 1, g.shape[2] + 1))),
                 seq={"g": g[..., :1].repeat(1, 1, g.shape[2] + 1)}),
        BadInput("integer g", ("g", "floating-point", "torch.int64"), seq={"g": g.detach().long()}),
    ]  # fmt: skip


def _cases(*, dtypes=(torch.float64,), max_T: int = 64, max_D: int = 16) -> st.SearchStrategy[Any]:
    return gated_retention_cases(dtypes=dtypes, max_T=max_T, max_D=max_D)


SPEC = OpSpec("gated_retention", _cases, _call, _reference, _magnitude, bad_inputs=_bad_inputs)
