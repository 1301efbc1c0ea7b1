"""Long sequences: T = 16384 with gamma = 1 - 2^-12 (and a head with gamma = 1) stays finite and accurate.

A correct implementation never forms ``gamma^(-t)`` (which overflows float32 long before t = 16384 at
small gamma, and loses all precision near 1); the float32 chunkwise form must track the token-by-token
recurrence, and bf16 inputs must stay close to a float64 evaluation of the same inputs.
"""

from __future__ import annotations

import pytest
import torch

from mixers import functional
from mixers.testing import norm_rel_error

pytestmark = pytest.mark.slow

B, T, H, D = 1, 16384, 2, 16
GAMMA = [1 - 2**-12, 1.0]


def recurrence_float64(q, k, v, gamma, s0):
    """``S_t = gamma S_{t-1} + k_t^T v_t``, ``o_t = q_t S_t`` token by token in float64 (the paper's form)."""
    q, k, v, state = q.double(), k.double(), v.double(), s0.double()
    g = torch.tensor(gamma, dtype=torch.float64)[None, :, None, None]
    outs = torch.empty(q.shape[0], q.shape[1], q.shape[2], v.shape[3], dtype=torch.float64)
    for t in range(q.shape[1]):
        state = g * state + k[:, t, :, :, None] * v[:, t, :, None, :]
        outs[:, t] = torch.einsum("bhd,bhde->bhe", q[:, t], state)
    return outs, state


@pytest.fixture(scope="module")
def float32_inputs():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, T, H, D, generator=gen) for _ in range(3))
    s0 = torch.randn(B, H, D, D, generator=gen)
    return q, k * D**-0.5, v, s0


@pytest.fixture(scope="module")
def float32_recurrent(float32_inputs):
    q, k, v, s0 = float32_inputs
    return functional.retention(q, k, v, GAMMA, mode="recurrent", initial_state=s0)


def assert_finite(*tensors):
    for t in tensors:
        assert torch.isfinite(t).all(), "inf/NaN in a long-sequence result"


@pytest.mark.parametrize("chunk_size", [None, 512, 1000])
def test_float32_chunkwise_tracks_recurrent(float32_inputs, float32_recurrent, chunk_size):
    q, k, v, s0 = float32_inputs
    rec_o, rec_s = float32_recurrent
    o, s = functional.retention(q, k, v, GAMMA, mode="chunkwise", chunk_size=chunk_size, initial_state=s0)
    assert_finite(o, s, rec_o, rec_s)
    assert norm_rel_error(o, rec_o) < 1e-4
    assert norm_rel_error(o[:, -1024:], rec_o[:, -1024:]) < 1e-4  # where any drift would have piled up
    assert norm_rel_error(s, rec_s) < 1e-4


def test_float32_recurrent_is_accurate(float32_inputs, float32_recurrent):
    """The float32 recurrence itself stays within 1e-4 of float64 over 16384 steps."""
    ref_o, ref_s = recurrence_float64(*float32_inputs[:3], GAMMA, float32_inputs[3])
    rec_o, rec_s = float32_recurrent
    assert norm_rel_error(rec_o, ref_o) < 1e-4
    assert norm_rel_error(rec_s, ref_s) < 1e-4


@pytest.fixture(scope="module")
def bfloat16_case(float32_inputs):
    q, k, v, s0 = float32_inputs
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    return (q, k, v, s0), recurrence_float64(q, k, v, GAMMA, s0)


@pytest.mark.parametrize("mode", ["chunkwise", "recurrent"])
def test_bfloat16_within_2e_2_of_float64_reference(bfloat16_case, mode):
    (q, k, v, s0), (ref_o, ref_s) = bfloat16_case
    o, s = functional.retention(q, k, v, GAMMA, mode=mode, initial_state=s0)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    assert_finite(o, s)
    assert norm_rel_error(o, ref_o) < 2e-2
    assert norm_rel_error(o[:, -1024:], ref_o[:, -1024:]) < 2e-2
    assert norm_rel_error(s, ref_s) < 2e-2


def test_small_gamma_long_sequence_has_no_overflow():
    """gamma = 2^-10 over 4096 tokens: gamma^(-t) would be inf; the chunkwise form must not need it."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 4096, 1, 8, generator=gen) for _ in range(3))
    s0 = torch.randn(1, 1, 8, 8, generator=gen)
    ref_o, ref_s = recurrence_float64(q, k, v, [2**-10], s0)
    for chunk_size in (64, 4096):
        o, s = functional.retention(q, k, v, 2**-10, mode="chunkwise", chunk_size=chunk_size, initial_state=s0)
        assert_finite(o, s)
        assert norm_rel_error(o, ref_o) < 1e-5
        assert norm_rel_error(s, ref_s) < 1e-5
