"""The ``softmax_attention`` op for the conformance kit: hypothesis cases and the ``OpSpec`` (``SPEC``) that
``mixers.testing.check_op_backend`` checks any backend of the op against (needs ``seqmixers[testing]``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from hypothesis import strategies as st
from torch import Tensor

from mixers import functional
from mixers.ops.softmax_attention import KVCache
from mixers.ops.softmax_attention.reference import softmax_attention_reference
from mixers.testing.ops import (
    BadInput,
    OpSpec,
    bad_chunk_sizes,
    bad_modes,
    bad_ranks,
    bad_state_dtypes,
    each_state_tensor,
)
from mixers.testing.strategies import OpInputs, as_input, chunk_sizes, generator


@dataclass(frozen=True)
class SoftmaxAttentionCase:
    """One softmax-attention example: ``H = Hkv * groups`` query heads, and a KV cache of ``Tc`` tokens and
    ``free`` free slots after them; with ``ragged``, each row holds its own number of tokens (0 to ``Tc``)."""

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
    free: int = 0
    ragged: bool = False

    def inputs(self, requires_grad: bool = False, device: torch.device | str | None = None) -> OpInputs:
        gen = generator(self.seed)
        B, T, Hkv, Dk, Dv, Tc = self.B, self.T, self.Hkv, self.Dk, self.Dv, self.Tc

        def randn(*shape: int) -> Tensor:
            return as_input(torch.randn(*shape, generator=gen, dtype=torch.float64), self.dtype, device, requires_grad)

        q, k, v = randn(B, T, Hkv * self.groups, Dk), randn(B, T, Hkv, Dk), randn(B, T, Hkv, Dv)
        cache = None
        if self.with_state:
            held = torch.randint(0, Tc + 1, (B,), generator=gen) if self.ragged else torch.full((B,), Tc)
            slots = (torch.arange(Tc + self.free) < held[:, None])[:, None, :, None]  # free slots are zeros
            kc = torch.randn(B, Hkv, Tc + self.free, Dk, generator=gen, dtype=torch.float64) * slots
            vc = torch.randn(B, Hkv, Tc + self.free, Dv, generator=gen, dtype=torch.float64) * slots
            length = held.to(device=device)
            cache = KVCache(
                as_input(kc, self.dtype, device, requires_grad), as_input(vc, self.dtype, device, requires_grad), length
            )
        return OpInputs({"q": q, "k": k, "v": v}, {}, cache)


@st.composite
def softmax_attention_cases(
    draw: st.DrawFn, *, max_T: int = 24, max_D: int = 8, dtypes: tuple[torch.dtype, ...] = (torch.float64,)
) -> SoftmaxAttentionCase:
    """B 1-2, Hkv 1-2 with 1-3 query heads each, Dk, Dv 1-``max_D``, T 1-``max_T``, a cache of 0-8 tokens with
    0-4 free slots (rows holding the same number of tokens, or each its own)."""
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
        free=draw(st.integers(0, 4)),
        ragged=draw(st.booleans()),
    )


def _softmax_call(seq, const, state, *, mode, chunk_size, backend):
    return functional.softmax_attention(
        seq["q"], seq["k"], seq["v"], mode=mode, chunk_size=chunk_size, initial_state=state, backend=backend
    )


def _softmax_reference(x: OpInputs):
    return softmax_attention_reference(x.seq["q"], x.seq["k"], x.seq["v"], x.state)


def _softmax_magnitude(x: OpInputs):  # softmax weights are positive: errors scale with |v|
    state = None if x.state is None else x.state._replace(v=x.state.v.abs())
    return softmax_attention_reference(x.seq["q"], x.seq["k"], x.seq["v"].abs(), state)


def _softmax_bad_inputs(inputs: OpInputs, state: Any) -> list[BadInput]:
    """The standard cases, but a KV cache of another batch size is reported by batch size, not by shape."""
    B = inputs.seq["q"].shape[0]
    cache_batches = [
        BadInput(
            f"state[{i}] for another batch size", ("initial_state", f"batch size {B + 1}", f"batch size {B}"), state=bad
        )
        for i, _, _, bad in each_state_tensor(state, lambda t: torch.cat([t, t[:1]]))
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


SPEC = OpSpec(
    "softmax_attention",
    _softmax_cases,
    _softmax_call,
    _softmax_reference,
    _softmax_magnitude,
    state_dtype=lambda dtype: dtype,  # the cache stores keys and values as they came
    bad_inputs=_softmax_bad_inputs,
)
