"""The ``linear_attention`` op for the conformance kit: hypothesis cases and the ``OpSpec`` (``SPEC``) that
``mixers.testing.check_op_backend`` checks any backend of the op against (needs ``seqmixers[testing]``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from hypothesis import strategies as st

from mixers import functional
from mixers.ops.checks import state_dtype
from mixers.ops.linear_attention import LinearState
from mixers.ops.linear_attention.reference import linear_attention_reference
from mixers.testing.ops import OpSpec, abs_state, core_bad_inputs
from mixers.testing.strategies import OpInputs, as_input, chunk_sizes, generator


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
        gen = generator(self.seed)
        B, T, H, Dk, Dv = self.B, self.T, self.H, self.Dk, self.Dv
        q, k = (torch.randn(B, T, H, Dk, generator=gen, dtype=torch.float64) for _ in range(2))
        if self.normalize:
            q, k = F.elu(q) + 1, F.elu(k) + 1
        v = torch.randn(B, T, H, Dv, generator=gen, dtype=torch.float64)
        kv0 = torch.rand(B, H, Dk, Dv, generator=gen, dtype=torch.float64)
        z0 = torch.rand(B, H, Dk, generator=gen, dtype=torch.float64)
        if not self.normalize:
            kv0 = kv0 * 2 - 1
        seq = {name: as_input(t, self.dtype, device, requires_grad) for name, t in (("q", q), ("k", k), ("v", v))}
        state = None
        if self.with_state:
            sd = state_dtype(self.dtype)
            state = LinearState(as_input(kv0, sd, device, requires_grad), as_input(z0, sd, device, requires_grad))
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
        return linear_attention_reference(q, k, v.abs(), abs_state(x.state), normalize=True)
    return linear_attention_reference(q.abs(), k.abs(), v.abs(), abs_state(x.state), normalize=False)


def _linear_cases(*, dtypes=(torch.float64,), max_T: int = 40, max_D: int = 8) -> st.SearchStrategy[Any]:
    return linear_attention_cases(dtypes=dtypes, max_T=max_T, max_D=max_D)


SPEC = OpSpec(
    "linear_attention",
    _linear_cases,
    _linear_call,
    _linear_reference,
    _linear_magnitude,
    bad_inputs=core_bad_inputs,
)
