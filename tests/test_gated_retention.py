"""Gated retention (issue 23): the identities that tie it to retention and linear attention, strong decays over
long sequences, bounded memory, and the mixer's initialisation. The conformance kit checks the op's torch backend
and the mixer against the float64 reference in every mode (tests/test_op_conformance.py,
tests/test_mixer_conformance.py); compile and context parallelism are in tests/test_compile.py and
tests/test_context_parallel.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import mixers
from mixers import functional
from mixers.backends.torch_gated_retention import GROUP
from mixers.gated_retention import GatedRetention
from mixers.ops.linear_attention import LinearState
from mixers.ops.retention.testing import retention_cases
from mixers.retention import MultiScaleRetention
from mixers.testing import assert_rel_close
from mixers.testing.strategies import MODES
from tests.test_chunkwise_memory import Produced
from tests.test_recurrent_backward import saved_bytes_of


@given(case=retention_cases(max_T=48, max_D=8), mode=st.sampled_from(MODES))
def test_constant_log_decay_is_retention(case, mode):
    """``g = log(gamma_h)`` at every token gives retention's output and state, in every mode and chunk size."""
    q, k, v, s0 = case.tensors()
    g = case.gamma_tensor.log().expand(case.B, case.T, case.H)
    kwargs = {"mode": mode, "chunk_size": case.chunk_size, "initial_state": s0}
    o, state = functional.gated_retention(q, k, v, g, **kwargs)
    o_ret, state_ret = functional.retention(q, k, v, case.gamma_tensor, **kwargs)
    assert_rel_close(o, o_ret, 1e-10, "output")
    assert_rel_close(state, state_ret, 1e-10, "state")


@given(case=retention_cases(max_T=48, max_D=8), mode=st.sampled_from(MODES))
def test_zero_log_decay_is_linear_attention_without_normaliser(case, mode):
    """``g = 0`` (no decay) is causal linear attention with ``normalize=False``: the same output and ``kv`` state."""
    q, k, v, s0 = case.tensors()
    g = torch.zeros(case.B, case.T, case.H, dtype=q.dtype)
    kwargs = {"mode": mode, "chunk_size": case.chunk_size}
    o, state = functional.gated_retention(q, k, v, g, initial_state=s0, **kwargs)
    z0 = None if s0 is None else torch.zeros(s0.shape[:-1], dtype=s0.dtype)
    o_lin, state_lin = functional.linear_attention(
        q, k, v, normalize=False, initial_state=None if s0 is None else LinearState(s0, z0), **kwargs
    )
    assert_rel_close(o, o_lin, 1e-10, "output")
    assert_rel_close(state, state_lin.kv, 1e-10, "state")


def token_loop(q, k, v, g):
    """``S_t = exp(g_t) S_{t-1} + k_t^T v_t``, ``o_t = q_t S_t`` in float64, one token at a time."""
    q, k, v, g = q.double(), k.double(), v.double(), g.double()
    S = q.new_zeros(q.shape[0], q.shape[2], q.shape[3], v.shape[3])
    out = []
    for t in range(q.shape[1]):
        S = g[:, t, :, None, None].exp() * S + k[:, t, :, :, None] * v[:, t, :, None, :]
        out.append(torch.einsum("bhd,bhde->bhe", q[:, t], S))
    return torch.stack(out, 1), S


def test_strong_decays_over_64k_tokens_in_float32():
    """65,536 tokens whose log decays run from 0 to -20 per token (a cumulative sum past -600,000): float32
    chunkwise and parallel-in-chunks results within 1e-5 of a float64 token loop. An exponential of a running sum
    over the sequence would underflow to 0 within 5 tokens of strong decay, and its reciprocal overflow."""
    gen = torch.Generator().manual_seed(0)
    B, T, H, D = 1, 65536, 2, 4
    q, k, v = (torch.randn(B, T, H, D, generator=gen) * 0.5 for _ in range(3))
    strong = torch.rand(B, T, H, generator=gen) < 0.5
    g = torch.where(strong, -20 * torch.rand(B, T, H, generator=gen), -0.01 * torch.rand(B, T, H, generator=gen))
    want_o, want_s = token_loop(q, k, v, g)
    for chunk in (64, 1000):
        o, s = functional.gated_retention(q, k, v, g, mode="chunkwise", chunk_size=chunk)
        assert torch.isfinite(o).all()
        assert_rel_close(o, want_o, 1e-5, f"chunk {chunk}: output")
        assert_rel_close(s, want_s, 1e-5, f"chunk {chunk}: state")


def test_float32_decay_gradients_track_float64_over_long_sequences():
    """The decays' gradient is a running sum over the sequence (the backward's identity): over 8,192 tokens the
    float32 gradients stay within 1e-4 of the float64 ones (the sum runs in float64)."""
    gen = torch.Generator().manual_seed(1)
    B, T, H, D = 1, 8192, 2, 8
    base = [torch.randn(B, T, H, D, generator=gen, dtype=torch.float64) * D**-0.25 for _ in range(3)]
    base.append(-0.05 * torch.rand(B, T, H, generator=gen, dtype=torch.float64))
    weight = torch.randn(B, T, H, D, generator=gen, dtype=torch.float64)
    grads = {}
    for dtype in (torch.float64, torch.float32):
        leaves = [t.to(dtype).requires_grad_() for t in base]
        o, s = functional.gated_retention(*leaves, mode="chunkwise", chunk_size=64)
        grads[dtype] = torch.autograd.grad((o.double() * weight).sum() + s.double().sum(), leaves)
    for name, g32, g64 in zip("qkvg", grads[torch.float32], grads[torch.float64], strict=True):
        assert_rel_close(g32, g64, 1e-4, f"d/d{name}")


def inputs(T: int, requires_grad: bool = False):
    gen = torch.Generator().manual_seed(T)
    B, H, Dk, Dv = 1, 2, 5, 7
    q, k = torch.randn(B, T, H, Dk, generator=gen), torch.randn(B, T, H, Dk, generator=gen) * Dk**-0.5
    v, g = torch.randn(B, T, H, Dv, generator=gen), -torch.rand(B, T, H, generator=gen)
    return [t.requires_grad_(requires_grad) for t in (q, k, v, g)]


@pytest.mark.parametrize("chunk", [1, 8])
def test_without_gradients_no_intermediate_grows_with_the_sequence(chunk):
    """4 and 16 groups of chunks: the same largest intermediate and at most GROUP states per tensor."""
    largest = {}
    for groups in (4, 16):
        q, k, v, g = inputs(groups * GROUP * chunk + 3)
        with torch.no_grad(), Produced() as seen:
            o, _ = functional.gated_retention(q, k, v, g, mode="chunkwise", chunk_size=chunk)
        assert seen.most_states(5, 7) <= GROUP
        largest[groups] = seen.largest(besides=o.numel())
    assert largest[16] == largest[4], largest


def test_recurrent_backward_saves_no_state_per_token():
    """From T = 64 to 256, what the recurrent call saves for its backward grows per token by its inputs (q, k, v
    and g: 36 float32 values over the 2 heads), not by a ``[Dk, Dv]`` state per head (70 values each)."""

    def run(T):
        q, k, v, g = inputs(T, requires_grad=True)
        return lambda: functional.gated_retention(q, k, v, g, mode="recurrent")

    per_token = (saved_bytes_of(run(256)) - saved_bytes_of(run(64))) / (256 - 64)
    assert per_token <= 2 * (5 + 5 + 7 + 1) * 4, f"{per_token:.0f} bytes saved per token, its inputs are 144"


def test_mixer_starts_as_retnet_with_the_papers_decays():
    """At initialisation every token of head h decays by ``1 - 2^(-5-h)``, and the layer computes what a
    ``MultiScaleRetention`` with the same weights computes."""
    torch.manual_seed(0)
    gated = mixers.build("gated_retention", 32, num_heads=4, conv_size=3).double()
    x = torch.randn(2, 20, 32, dtype=torch.float64)
    g = gated.decays(x)
    want = torch.tensor([math.log(1 - 2.0 ** (-5 - h)) for h in range(4)], dtype=torch.float64)
    assert_rel_close(g, want.expand_as(g), 1e-6, "initial log decays (the bias is a float32 parameter)")
    retnet = MultiScaleRetention(32, num_heads=4, conv_size=3).double()
    retnet.load_state_dict({n: p for n, p in gated.state_dict().items() if not n.startswith("decay_proj")})
    assert_rel_close(gated(x)[0], retnet(x)[0], 1e-7, "output at initialisation (decays from a float32 bias)")


def test_mixer_decays_depend_on_the_input_and_learn():
    """The decay projection gets a gradient, so the decays become data-dependent."""
    torch.manual_seed(0)
    gated = GatedRetention(16, num_heads=2)
    y, _ = gated(torch.randn(2, 9, 16), mode="chunkwise", chunk_size=4)
    y.square().sum().backward()
    assert gated.decay_proj.weight.grad.abs().sum() > 0
    assert gated.decay_proj.bias.grad.abs().sum() > 0


def test_mixer_keeps_decays_in_float32_under_bfloat16_autocast():
    """A long-memory head's log decay ``log(1 - 2^-12)`` is lost if its bias is rounded to bfloat16: under
    autocast the decays come out float32, the bias added in float32."""
    gated = GatedRetention(16, num_heads=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        g = gated.decays(torch.randn(1, 3, 16))
    assert g.dtype == torch.float32
    assert_rel_close(g[0, 0, -1], torch.tensor(math.log(1 - 2.0**-12)), 1e-5, "the slowest head's log decay")


@pytest.mark.parametrize(
    ("options", "message"),
    [({"tau": 0}, "tau must be a positive number"), ({"gammas": [0.5, 1.0]}, "gammas .* must lie in \\(0, 1\\)")],
)
def test_mixer_rejects_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        GatedRetention(16, num_heads=2, **options)


def test_op_rejects_misshapen_decays():
    q = torch.randn(1, 4, 2, 3)
    with pytest.raises(ValueError, match=r"g must be \[B, T, H\] = \[1, 4, 2\].*got \[1, 4\]"):
        functional.gated_retention(q, q, q, torch.zeros(1, 4), mode="parallel")
