"""Linear attention: the op against a float64 reference written from the formula, the denominator guard
under adversarial inputs, state validation, feature maps as registered components, and the mixer's options.

The generic properties every mixer shares (modes agree, split hand-over, causality, bad input) live in
the conformance suite; here are the properties specific to linear attention.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import mixers
from mixers import functional
from mixers.functional import LinearState
from mixers.linear_attention import LinearAttention
from mixers.listing import format_listing
from mixers.ops.checks import state_dtype
from mixers.ops.linear_attention.reference import linear_attention_reference
from mixers.plugins import DEFAULT_PLUGINS
from mixers.registry import Registry
from mixers.testing.reference import short_conv_reference

MODES = functional.MODES
# (rtol, atol) per dtype, against a float64 reference
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 2e-5)}


def reference(q, k, v, kv0=None, z0=None, *, normalize=True, eps=1e-6):
    """The kit's float64 reference written from the formula (``mixers.testing.reference``), as ``(o, kv, z)``.

    ``o_t = (q_t kv_0 + sum_{s<=t} (q_t . k_s) v_s) / guard(q_t . (z_0 + sum_{s<=t} k_s))``, with the guard as
    documented; each output sums its own prefix directly, with no recurrence.
    """
    assert (kv0 is None) == (z0 is None), "give both parts of the initial state, or neither"
    o, (kv, z) = linear_attention_reference(q, k, v, None if kv0 is None else (kv0, z0), normalize=normalize, eps=eps)
    return o, kv, z


def positive_features(shape, gen, dtype):
    return (F.elu(torch.randn(shape, generator=gen, dtype=torch.float64)) + 1).to(dtype)


@st.composite
def problems(draw, dtypes=(torch.float32, torch.float64)):
    """Shapes, modes, a split point with state hand-over, and inputs drawn from a seed."""
    B, T, H = draw(st.integers(1, 2)), draw(st.integers(0, 20)), draw(st.integers(1, 3))
    Dk, Dv = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    dtype = draw(st.sampled_from(dtypes))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    normalize = draw(st.booleans())
    if normalize:  # positive features keep the normaliser well away from the guard
        q, k = positive_features((B, T, H, Dk), gen, dtype), positive_features((B, T, H, Dk), gen, dtype)
    else:  # the plain sum is fine with signed features
        q, k = (torch.randn(B, T, H, Dk, generator=gen, dtype=torch.float64).to(dtype) for _ in range(2))
    v = torch.randn(B, T, H, Dv, generator=gen, dtype=torch.float64).to(dtype)
    state = None
    if draw(st.booleans()):
        sd = state_dtype(dtype)
        state = (
            torch.rand(B, H, Dk, Dv, generator=gen, dtype=torch.float64).to(sd),
            torch.rand(B, H, Dk, generator=gen, dtype=torch.float64).to(sd),
        )
    return dict(
        q=q,
        k=k,
        v=v,
        state=state,
        normalize=normalize,
        split=draw(st.integers(0, T)),
        modes=(draw(st.sampled_from(MODES)), draw(st.sampled_from(MODES))),
        chunks=(draw(st.integers(1, 24)), draw(st.integers(1, 24))),
    )


@given(problems())
def test_op_matches_reference_across_modes_and_a_split(p):
    """Two calls (drawn modes and chunk sizes, the state handed over at a drawn split) = the formula."""
    q, k, v, t = p["q"], p["k"], p["v"], p["split"]
    o1, s1 = functional.linear_attention(
        q[:, :t], k[:, :t], v[:, :t], mode=p["modes"][0], chunk_size=p["chunks"][0],
        initial_state=p["state"], normalize=p["normalize"],
    )  # fmt: skip
    o2, s2 = functional.linear_attention(
        q[:, t:], k[:, t:], v[:, t:], mode=p["modes"][1], chunk_size=p["chunks"][1],
        initial_state=s1, normalize=p["normalize"],
    )  # fmt: skip
    kv0, z0 = p["state"] if p["state"] is not None else (None, None)
    ref_o, ref_kv, ref_z = reference(q, k, v, kv0, z0, normalize=p["normalize"])
    rtol, atol = TOL[q.dtype]
    o = torch.cat([o1, o2], dim=1)
    assert o.dtype == q.dtype and o.shape == ref_o.shape
    torch.testing.assert_close(o.double(), ref_o, rtol=rtol, atol=atol)
    assert isinstance(s2, functional.LinearState)
    assert s2.kv.dtype == s2.z.dtype == state_dtype(q.dtype)
    torch.testing.assert_close(s2.kv.double(), ref_kv, rtol=rtol, atol=atol)
    torch.testing.assert_close(s2.z.double(), ref_z, rtol=rtol, atol=atol)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("mode,chunk", [("parallel", None), ("chunkwise", 3), ("chunkwise", 64), ("recurrent", None)])
def test_op_gradients_match_reference(mode, chunk, normalize):
    gen = torch.Generator().manual_seed(1)
    B, T, H, Dk, Dv = 2, 11, 2, 4, 3
    q, k = (positive_features((B, T, H, Dk), gen, torch.float64) for _ in range(2))
    v = torch.randn(B, T, H, Dv, generator=gen, dtype=torch.float64)
    kv0, z0 = torch.rand(B, H, Dk, Dv, generator=gen, dtype=torch.float64), torch.rand(B, H, Dk, generator=gen).double()
    inputs = [t.requires_grad_() for t in (q, k, v, kv0, z0)]
    weights = [torch.randn(s, generator=gen, dtype=torch.float64) for s in ((B, T, H, Dv), (B, H, Dk, Dv), (B, H, Dk))]

    def loss(o, kv, z):  # a random linear functional of every output, so that every gradient path counts
        return sum((w * x).sum() for w, x in zip(weights, (o, kv, z), strict=True))

    o, (kv, z) = functional.linear_attention(
        q, k, v, mode=mode, chunk_size=chunk, initial_state=(kv0, z0), normalize=normalize
    )
    got = torch.autograd.grad(loss(o, kv, z), inputs)
    want = torch.autograd.grad(loss(*reference(q, k, v, kv0, z0, normalize=normalize)), inputs)
    for name, g, w in zip(("q", "k", "v", "kv0", "z0"), got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10, msg=lambda m, n=name: f"d/d{n}: {m}")


@pytest.mark.parametrize("mode", MODES)
def test_op_bfloat16_is_close_to_reference(mode):
    gen = torch.Generator().manual_seed(2)
    q, k = (positive_features((2, 40, 2, 8), gen, torch.bfloat16) for _ in range(2))
    v = torch.randn(2, 40, 2, 8, generator=gen).bfloat16()
    o, (kv, z) = functional.linear_attention(q, k, v, mode=mode, chunk_size=16)
    assert o.dtype == torch.bfloat16 and kv.dtype == z.dtype == torch.float32
    ref_o, ref_kv, _ = reference(q, k, v)
    assert (o.double() - ref_o).norm() / ref_o.norm() < 1.6e-2  # relative RMS error, bf16 rounding of o
    assert (kv.double() - ref_kv).norm() / ref_kv.norm() < 1e-5  # the state accumulates in float32


# -- the denominator guard --------------------------------------------------------------------------


@given(
    seed=st.integers(0, 2**31 - 1),
    feature=st.sampled_from(["relu", "elu+1"]),
    k_exponent=st.integers(0, 30),
    q_exponent=st.integers(0, 30),
    zero_fraction=st.sampled_from([0.0, 0.5, 1.0]),
    mode=st.sampled_from(MODES),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_non_negative_features_stay_finite_and_bounded_when_the_normaliser_is_tiny(
    seed, feature, k_exponent, q_exponent, zero_fraction, mode, dtype
):
    """Features scaled down by up to 1e-30 and randomly zeroed: o and its gradients stay finite, and
    ``|o| <= max |v|`` (the guard only shrinks a weighted mean of values)."""
    gen = torch.Generator().manual_seed(seed)
    phi = mixers.get_registry().get_feature_map(feature).fn
    B, T, H, D = 2, 9, 2, 4
    keep = (torch.rand(B, T, H, 1, generator=gen) >= zero_fraction).to(dtype)
    q = (phi(torch.randn(B, T, H, D, generator=gen).to(dtype) - 1) * 10.0**-q_exponent).requires_grad_()
    k = (phi(torch.randn(B, T, H, D, generator=gen).to(dtype) - 1) * 10.0**-k_exponent * keep).requires_grad_()
    v = torch.randn(B, T, H, D, generator=gen).to(dtype).requires_grad_()
    o, (kv, z) = functional.linear_attention(q, k, v, mode=mode, chunk_size=4)
    assert torch.isfinite(o).all()
    bound = v.detach().abs().amax(dim=(1, 3), keepdim=True)  # max |v| per batch entry and head
    assert (o.detach().abs() <= bound * (1 + 1e-5)).all()
    grads = torch.autograd.grad(o.square().sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)


@given(seed=st.integers(0, 2**31 - 1), mode=st.sampled_from(MODES), scale=st.sampled_from([1e-3, 1e-7, 0.0]))
def test_signed_features_stay_finite_when_the_normaliser_crosses_zero(seed, mode, scale):
    """Identity features with ``sum_s k_s`` cancelling to (nearly) zero: the guard keeps ``|o| <= |num| / eps``."""
    gen = torch.Generator().manual_seed(seed)
    B, T, H, D = 1, 8, 2, 4
    k = torch.randn(B, T, H, D, generator=gen, dtype=torch.float64)
    k[:, 1::2] = -k[:, 0::2] + scale * torch.randn(B, T // 2, H, D, generator=gen, dtype=torch.float64)
    q = torch.randn(B, T, H, D, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, T, H, D, generator=gen, dtype=torch.float64)
    o, _ = functional.linear_attention(q, k.requires_grad_(), v, mode=mode, chunk_size=3, eps=1e-6)
    num, _ = functional.linear_attention(q, k, v, mode=mode, chunk_size=3, normalize=False)
    assert torch.isfinite(o).all()
    assert (o.abs() <= num.abs() / 1e-6 * (1 + 1e-9) + 1e-300).all()
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(o.sum(), (q, k)))


@pytest.mark.parametrize("mode", MODES)
def test_guard_engages_as_documented(mode):
    """All-zero features give exactly 0 (not 0/0); a normaliser below eps is replaced by +-eps."""
    z = torch.zeros(1, 3, 1, 2)
    v = torch.ones(1, 3, 1, 1)
    o, _ = functional.linear_attention(z, z, v, mode=mode)
    assert torch.equal(o, torch.zeros_like(o))
    q = torch.tensor([1.0, 0.0]).expand(1, 3, 1, 2).double()
    k = q * 1e-9  # normaliser t * 1e-9 < eps = 1e-6; numerator t * 1e-9 * v
    o, _ = functional.linear_attention(q, k, v.double(), mode=mode)
    torch.testing.assert_close(o.flatten(), torch.tensor([1e-3, 2e-3, 3e-3], dtype=torch.float64), rtol=1e-9, atol=0)
    o, _ = functional.linear_attention(-q, k, v.double(), mode=mode)  # negative normaliser: -eps
    torch.testing.assert_close(o.flatten(), torch.tensor([1e-3, 2e-3, 3e-3], dtype=torch.float64), rtol=1e-9, atol=0)


# -- validation -------------------------------------------------------------------------------------


def _qkv(B=2, T=5, H=3, Dk=4, Dv=6, dtype=torch.float32):
    return torch.rand(B, T, H, Dk, dtype=dtype), torch.rand(B, T, H, Dk, dtype=dtype), torch.rand(B, T, H, Dv)


@pytest.mark.parametrize(
    "state,error,match",
    [
        (torch.zeros(2, 3, 4, 6), TypeError, r"initial_state must be None or a pair \(kv \[B, H, Dk, Dv\], z"),
        ((torch.zeros(2, 3, 4, 6),), TypeError, "must be None or a pair"),
        ((torch.zeros(2, 3, 4, 6), None), TypeError, "two tensors"),
        (
            (torch.zeros(2, 3, 4, 5), torch.zeros(2, 3, 4)),
            ValueError,
            r"initial_state.kv must have shape \[2, 3, 4, 6\], got \[2, 3, 4, 5\]",
        ),
        (
            (torch.zeros(1, 3, 4, 6), torch.zeros(2, 3, 4)),
            ValueError,
            r"initial_state.kv must have shape \[2, 3, 4, 6\], got \[1, 3, 4, 6\]",
        ),
        (
            (torch.zeros(2, 3, 4, 6), torch.zeros(2, 3)),
            ValueError,
            r"initial_state.z must have shape \[2, 3, 4\], got \[2, 3\]",
        ),
        (
            (torch.zeros(2, 3, 4, 6), torch.zeros(2, 3, 4).double()),
            TypeError,
            "initial_state.z must have dtype torch.float32, got torch.float64",
        ),
    ],
)
def test_bad_state_is_rejected_clearly(state, error, match):
    q, k, v = _qkv()
    with pytest.raises(error, match=match):
        functional.linear_attention(q, k, v, mode="recurrent", initial_state=state)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(eps=0.0), ValueError, "eps must be a finite number > 0, got 0.0"),
        (dict(eps=float("nan")), ValueError, "eps must be a finite number > 0"),
        (dict(normalize=1), TypeError, "normalize must be a bool, got int 1"),
        (dict(mode="fast"), ValueError, "mode must be one of"),
        (
            dict(backend="nope"),
            ValueError,
            "unknown backend 'nope' for op 'linear_attention'; expected 'auto' or one of",
        ),
    ],
)
def test_bad_arguments_are_rejected_clearly(kwargs, error, match):
    q, k, v = _qkv()
    with pytest.raises(error, match=match):
        functional.linear_attention(q, k, v, **{"mode": "parallel", **kwargs})


# -- the mixer --------------------------------------------------------------------------------------


def _hidden(mixer: LinearAttention, x: torch.Tensor) -> torch.Tensor:
    """What the mixer feeds its output projection."""
    seen = []
    handle = mixer.out_proj.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    try:
        mixer(x)
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("feature_map", ["elu+1", "relu", "identity"])
@pytest.mark.parametrize("normalize", [True, False])
def test_mixer_computes_the_formula(feature_map, normalize):
    """``y = W_O LinAttn(phi(x W_Q) [* D^-0.5 if unnormalised], phi(x W_K), x W_V)``, from the weights."""
    torch.manual_seed(0)
    mixer = LinearAttention(12, num_heads=3, feature_map=feature_map, normalize=normalize).double()
    x = torch.randn(2, 7, 12, dtype=torch.float64)
    Wq, Wk, Wv = mixer.in_proj.weight.split(mixer.widths, dim=0)
    phi = {"elu+1": lambda t: F.elu(t) + 1, "relu": F.relu, "identity": lambda t: t}[feature_map]
    q, k, v = ((x @ W.T).view(2, 7, 3, 4) for W in (Wq, Wk, Wv))
    q, k = phi(q) * (1.0 if normalize else 4**-0.5), phi(k)
    o, _, _ = reference(q, k, v, normalize=normalize)
    y, state = mixer(x)
    torch.testing.assert_close(y, o.reshape(2, 7, 12) @ mixer.out_proj.weight.T, rtol=1e-9, atol=1e-9)
    assert isinstance(state.op, LinearState) and state.offset == 7


@pytest.mark.parametrize("conv_size", [1, 4])
def test_mixer_with_a_short_convolution_computes_the_formula(conv_size):
    """q, k, v go through the short convolution (then SiLU) before the feature map; the window is handed over."""
    torch.manual_seed(0)
    mixer = LinearAttention(12, num_heads=3, conv_size=conv_size).double()
    x = torch.randn(2, 9, 12, dtype=torch.float64)
    qkv = short_conv_reference(x @ mixer.in_proj.weight.T, mixer.conv.weight)
    q, k, v = (t.reshape(2, 9, 3, 4) for t in qkv.split(mixer.widths, dim=-1))
    o, _, _ = reference(F.elu(q) + 1, F.elu(k) + 1, v)
    want = o.reshape(2, 9, 12) @ mixer.out_proj.weight.T
    for mode in ("parallel", "chunkwise", "recurrent"):
        y, state = mixer(x, mode=mode, chunk_size=4)
        torch.testing.assert_close(y, want, rtol=1e-9, atol=1e-9)
        assert state.conv.shape == (2, conv_size - 1, 36)
    y1, s1 = mixer(x[:, :2], mode="recurrent")
    y2, _ = mixer(x[:, 2:], s1, mode="chunkwise", chunk_size=3)
    torch.testing.assert_close(torch.cat([y1, y2], dim=1), want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("norm", [None, "rmsnorm", "groupnorm"])
@pytest.mark.parametrize("gate", [False, True])
def test_mixer_gate_and_norm(norm, gate):
    torch.manual_seed(0)
    mixer = LinearAttention(8, num_heads=2, gate=gate, norm=norm, norm_affine=False).double()
    x = torch.randn(1, 6, 8, dtype=torch.float64)
    q, k, v, *g = (x @ W.T for W in mixer.in_proj.weight.split(mixer.widths, dim=0))
    assert len(g) == int(gate)
    o, _, _ = reference(F.elu(q.view(1, 6, 2, 4)) + 1, F.elu(k.view(1, 6, 2, 4)) + 1, v.view(1, 6, 2, 4))
    if norm == "rmsnorm":
        o = o / o.pow(2).mean(-1, keepdim=True).add(mixer.head_norm.eps).sqrt()
    elif norm == "groupnorm":
        o = (o - o.mean(-1, keepdim=True)) / o.var(-1, unbiased=False, keepdim=True).add(mixer.head_norm.eps).sqrt()
    want = o.reshape(1, 6, 8) * (F.silu(g[0]) if gate else 1)
    torch.testing.assert_close(_hidden(mixer, x), want, rtol=1e-9, atol=1e-9)


def test_mixer_state_size_does_not_grow_with_the_sequence():
    mixer = LinearAttention(16, num_heads=2)
    x = torch.randn(1, 40, 16)
    _, short = mixer(x[:, :4], mode="recurrent")
    _, long = mixer(x, mode="chunkwise", chunk_size=8)
    assert short.nbytes == long.nbytes == mixer.init_state(1).nbytes == 4 * (2 * 8 * 8 + 2 * 8) + 8  # and pos
    empty = mixer.init_state(3, dtype=torch.float64)
    assert empty.op.kv.shape == (3, 2, 8, 8) and empty.op.z.shape == (3, 2, 8) and empty.op.kv.dtype == torch.float64


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(feature_map="cosh"), ValueError, r"unknown feature map 'cosh'; registered feature maps: \[.*'elu\+1'"),
        (dict(norm="layernorm"), ValueError, "norm must be one of"),
        (dict(eps=-1.0), ValueError, "eps must be a finite number > 0"),
        (dict(num_heads=3), ValueError, "not divisible by num_heads=3"),
        (dict(value_dim=7, num_heads=2), ValueError, "value_dim must be a positive multiple of num_heads=2"),
    ],
)
def test_mixer_rejects_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        LinearAttention(16, **kwargs)


def test_mixer_rejects_a_state_from_another_mixer_or_batch():
    mixer = LinearAttention(8, num_heads=2)
    x = torch.randn(2, 3, 8)
    with pytest.raises(TypeError, match="state.op must be a LinearState"):
        mixer(x, mixers.MixerState.start(None, 2))
    with pytest.raises(ValueError, match=r"state \(MixerState\) is for batch size 3, but x has batch size 2"):
        mixer(x, mixer.init_state(3))


# -- feature maps as registered components ----------------------------------------------------------


@pytest.fixture
def registry_with_plugin(monkeypatch):
    """A fresh registry (built-ins + a throwaway plugin) installed as the process-wide one for one test."""

    def make(plugin: types.ModuleType) -> Registry:
        monkeypatch.setitem(sys.modules, plugin.__name__, plugin)
        registry = Registry().load(builtins=(*DEFAULT_PLUGINS, plugin.__name__), entry_points=False)
        monkeypatch.setattr("mixers.registry._REGISTRY", registry)
        return registry

    return make


def _plugin(name: str, **maps) -> types.ModuleType:
    module = types.ModuleType(name)

    @mixers.hookimpl
    def register_feature_maps(register):
        for map_name, fn in maps.items():
            register(map_name, fn, description=f"from {name}")

    module.register_feature_maps = register_feature_maps
    return module


def test_a_plugin_feature_map_is_listed_and_used(registry_with_plugin):
    """A map that doubles the width (``[relu(x), relu(-x)]``): the state and the op follow it."""
    registry = registry_with_plugin(
        _plugin("seqmixers_test_fm", split_relu=lambda x: torch.cat([F.relu(x), F.relu(-x)], dim=-1))
    )
    assert registry.feature_maps["split_relu"].plugin == "seqmixers_test_fm"
    assert "split_relu" in format_listing(registry) and "from seqmixers_test_fm" in format_listing(registry)
    mixer = mixers.build("linear_attention", 8, num_heads=2, feature_map="split_relu")
    assert mixer.feature_dim == 8
    x = torch.randn(2, 9, 8)
    y, state = mixer(x, mode="parallel")
    assert state.op.kv.shape == (2, 2, 8, 4) and state.op.z.shape == (2, 2, 8)
    y_rec, _ = mixer(x, mode="recurrent")
    torch.testing.assert_close(y_rec, y, rtol=1e-5, atol=1e-6)


def test_a_duplicate_feature_map_is_reported_and_the_first_kept(registry_with_plugin):
    registry = registry_with_plugin(_plugin("seqmixers_test_dup", relu=torch.sigmoid))
    assert registry.feature_maps["relu"].plugin == "mixers.linear_attention"
    assert registry.feature_maps["relu"].fn is not torch.sigmoid
    errors = registry.plugins["seqmixers_test_dup"].errors
    assert any("feature map 'relu' is already registered by plugin 'mixers.linear_attention'" in e for e in errors)


def test_a_malformed_feature_map_is_refused(registry_with_plugin):
    registry = registry_with_plugin(_plugin("seqmixers_test_bad", broken="not callable"))
    assert "broken" not in registry.feature_maps
    assert any("feature map 'broken': fn must be callable" in e for e in registry.plugins["seqmixers_test_bad"].errors)


def test_a_feature_map_that_changes_the_token_axes_is_refused_at_construction(registry_with_plugin):
    registry_with_plugin(_plugin("seqmixers_test_shape", pooled=lambda x: x.mean(dim=1, keepdim=True)))
    with pytest.raises(ValueError, match=r"feature map 'pooled' must map \[B, T, H, D\] to \[B, T, H, D'\]"):
        LinearAttention(8, num_heads=2, feature_map="pooled")
