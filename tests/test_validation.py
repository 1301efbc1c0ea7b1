"""Bad input raises ``ValueError`` or ``TypeError`` whose message names what was expected and what was given."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import mixers
from mixers import functional
from mixers.interface import MixerState

B, T, H, DK, DV = 2, 5, 3, 4, 6


def q_():
    return torch.randn(B, T, H, DK)


def v_():
    return torch.randn(B, T, H, DV)


def retention(**changes):
    """Call the op on valid inputs with some of them replaced."""
    kwargs = {
        "q": q_(),
        "k": q_(),
        "v": v_(),
        "gamma": 0.9,
        "mode": "chunkwise",
        "chunk_size": 2,
        "initial_state": torch.zeros(B, H, DK, DV),
    }
    kwargs.update(changes)
    return lambda: functional.retention(**kwargs)


OP_CASES = [
    # ranks
    pytest.param(
        retention(q=torch.randn(B, T, H * DK)), ValueError, ["q", "rank 4", "rank 3", "[2, 5, 12]"], id="q-rank3"
    ),
    pytest.param(retention(k=torch.randn(1, B, T, H, DK)), ValueError, ["k", "rank 4", "rank 5"], id="k-rank5"),
    pytest.param(retention(v=torch.randn(B, T, H)), ValueError, ["v", "rank 4", "rank 3", "[2, 5, 3]"], id="v-rank3"),
    # mismatched B / T / H / D
    pytest.param(retention(k=torch.randn(B, T + 1, H, DK)), ValueError, ["[2, 5, 3, 4]", "[2, 6, 3, 4]"], id="k-T"),
    pytest.param(retention(k=torch.randn(B, T, H, DK + 1)), ValueError, ["[2, 5, 3, 4]", "[2, 5, 3, 5]"], id="k-Dk"),
    pytest.param(retention(k=torch.randn(B, T, H + 1, DK)), ValueError, ["[2, 5, 3, 4]", "[2, 5, 4, 4]"], id="k-H"),
    pytest.param(retention(v=torch.randn(B + 1, T, H, DV)), ValueError, ["(2, 5, 3)", "[3, 5, 3, 6]"], id="v-B"),
    pytest.param(retention(v=torch.randn(B, T - 1, H, DV)), ValueError, ["(2, 5, 3)", "[2, 4, 3, 6]"], id="v-T"),
    pytest.param(retention(v=torch.randn(B, T, H - 1, DV)), ValueError, ["(2, 5, 3)", "[2, 5, 2, 6]"], id="v-H"),
    # empty head widths (B = 0 or T = 0 is a valid empty input; a head of width 0 is not)
    pytest.param(
        retention(q=torch.randn(B, T, H, 0), k=torch.randn(B, T, H, 0), initial_state=None),
        ValueError,
        ["Dk (the q/k head width) must be at least 1", "got 0"],
        id="Dk-0",
    ),
    pytest.param(retention(v=torch.randn(B, T, H, 0), initial_state=None), ValueError, ["Dv", "got 0"], id="Dv-0"),
    # types
    pytest.param(retention(k=q_().double()), TypeError, ["one dtype", "torch.float32", "torch.float64"], id="k-dtype"),
    pytest.param(retention(q=torch.ones(B, T, H, DK, dtype=torch.int64)), TypeError, ["floating", "int64"], id="q-int"),
    pytest.param(retention(v=[[1.0]]), TypeError, ["v", "torch.Tensor", "list"], id="v-list"),
    # gamma outside (0, 1]
    pytest.param(retention(gamma=0.0), ValueError, ["(0, 1]", "0.0"], id="gamma-0"),
    pytest.param(retention(gamma=-0.5), ValueError, ["(0, 1]", "-0.5"], id="gamma-negative"),
    pytest.param(retention(gamma=1.5), ValueError, ["(0, 1]", "1.5"], id="gamma-above-1"),
    pytest.param(retention(gamma=math.nan), ValueError, ["(0, 1]", "nan"], id="gamma-nan"),
    pytest.param(retention(gamma=math.inf), ValueError, ["(0, 1]", "inf"], id="gamma-inf"),
    pytest.param(retention(gamma=[0.9, 1.0, 1.0 + 1e-9]), ValueError, ["(0, 1]", "1.000000001"], id="gamma-list"),
    pytest.param(retention(gamma=torch.tensor([0.5, 0.0, 0.5])), ValueError, ["(0, 1]", "0.0"], id="gamma-tensor"),
    pytest.param(retention(gamma=torch.tensor([0.5, 0.5])), ValueError, ["[H] = [3]", "[2]"], id="gamma-shape"),
    pytest.param(retention(gamma=[0.5, 0.5]), ValueError, ["H = 3", "got 2"], id="gamma-length"),
    pytest.param(retention(gamma="0.9"), TypeError, ["gamma", "'0.9'"], id="gamma-str"),
    pytest.param(
        retention(gamma=torch.full((H,), 0.9, requires_grad=True)),
        ValueError,
        ["gamma", "requires_grad=True", "never learn", "gamma.detach()"],
        id="gamma-requires-grad",
    ),
    # chunk size and mode
    pytest.param(retention(chunk_size=0), ValueError, ["chunk_size", ">= 1", "got 0"], id="chunk-0"),
    pytest.param(retention(chunk_size=-3), ValueError, ["chunk_size", ">= 1", "got -3"], id="chunk-negative"),
    pytest.param(retention(mode="recurrent", chunk_size=0), ValueError, [">= 1", "got 0"], id="chunk-0-recurrent"),
    pytest.param(retention(chunk_size=2.5), TypeError, ["chunk_size", "int", "2.5"], id="chunk-float"),
    pytest.param(retention(chunk_size=True), TypeError, ["chunk_size", "int", "True"], id="chunk-bool"),
    pytest.param(
        retention(mode="chunked"),
        ValueError,
        ["'parallel'", "'chunkwise'", "'recurrent'", "'chunked'"],
        id="mode-unknown",
    ),
    # initial state: shape, dtype, device
    pytest.param(
        retention(initial_state=torch.zeros(B, H, DK, DV + 1)),
        ValueError,
        ["[2, 3, 4, 6]", "[2, 3, 4, 7]"],
        id="state-shape",
    ),
    pytest.param(
        retention(initial_state=torch.zeros(B + 1, H, DK, DV)),
        ValueError,
        ["[2, 3, 4, 6]", "[3, 3, 4, 6]"],
        id="state-batch",
    ),
    pytest.param(
        retention(initial_state=torch.zeros(B, H, DK)), ValueError, ["[2, 3, 4, 6]", "[2, 3, 4]"], id="state-rank"
    ),
    pytest.param(
        retention(initial_state=torch.zeros(B, H, DK, DV, dtype=torch.float64)),
        TypeError,
        ["torch.float32", "torch.float64"],
        id="state-dtype",
    ),
    pytest.param(
        retention(
            q=q_().bfloat16(),
            k=q_().bfloat16(),
            v=v_().bfloat16(),
            initial_state=torch.zeros(B, H, DK, DV, dtype=torch.bfloat16),
        ),
        TypeError,
        ["torch.float32", "torch.bfloat16"],
        id="state-dtype-bf16",
    ),
    pytest.param(
        retention(initial_state=torch.zeros(B, H, DK, DV, device="meta")),
        ValueError,
        ["cpu", "meta"],
        id="state-device",
    ),
    pytest.param(retention(initial_state=[0.0]), TypeError, ["initial_state", "list"], id="state-list"),
    # backend
    pytest.param(retention(backend="fastest"), ValueError, ["'fastest'", "'auto'", "'torch'"], id="backend-unknown"),
    pytest.param(retention(backend=None), TypeError, ["backend", "str", "NoneType"], id="backend-none"),
]


def check_raises(call, exc, fragments):
    with pytest.raises(exc) as info:
        call()
    message = str(info.value)
    missing = [f for f in fragments if f not in message]
    assert not missing, f"message {message!r} lacks {missing}"


@pytest.mark.parametrize(("call", "exc", "fragments"), OP_CASES)
def test_op_rejects_bad_input(call, exc, fragments):
    check_raises(call, exc, fragments)


def test_op_accepts_the_valid_baseline():
    """The inputs the cases above corrupt are valid as they are (so each case tests its one change)."""
    o, s = retention()()
    assert o.shape == (B, T, H, DV) and s.shape == (B, H, DK, DV)


def build(name="retention", d_model=24, **options):
    return lambda: mixers.build(name, d_model, **options)


MIXER_BUILD_CASES = [
    pytest.param(build("retnet"), ValueError, ["'retnet'", "'retention'"], id="unknown-mixer"),
    pytest.param(build(d_model=10, num_heads=3), ValueError, ["d_model=10", "num_heads=3"], id="heads-not-dividing"),
    pytest.param(build(num_heads=0), ValueError, ["num_heads", "positive", "0"], id="zero-heads"),
    pytest.param(build(d_model=-4), ValueError, ["d_model", "positive", "-4"], id="negative-width"),
    pytest.param(build(d_model=6, num_heads=2), ValueError, ["even", "3"], id="odd-rotary-head-dim"),
    pytest.param(build(num_heads=3, value_dim=10), ValueError, ["value_dim", "num_heads=3", "10"], id="value-dim"),
    pytest.param(build(norm="layernorm"), ValueError, ["'groupnorm'", "'rmsnorm'", "'layernorm'"], id="norm"),
    pytest.param(build(rope_layout="spiral"), ValueError, ["'half'", "'interleaved'", "'spiral'"], id="rope-layout"),
    pytest.param(build(gammas=[0.5, 1.5], num_heads=2), ValueError, ["(0, 1]", "1.5"], id="gammas"),
    pytest.param(build(chunk_size=0), ValueError, ["chunk_size", "got 0"], id="chunk-size"),
    pytest.param(
        build(gammas=torch.nn.Parameter(torch.full((3,), 0.9)), num_heads=3),
        ValueError,
        ["gamma", "requires_grad=True", "gamma.detach()"],
        id="learnable-gammas",
    ),
    # misspelt options: the close match, the mixer and its options
    pytest.param(
        build(num_head=3),
        TypeError,
        ["unknown option 'num_head'", "did you mean 'num_heads'?", "mixer 'retention'", "'head_dim'", "'backend'"],
        id="option-typo",
    ),
    pytest.param(
        build("linear_attention", feature_mapp="relu"),
        TypeError,
        ["'feature_mapp'", "did you mean 'feature_map'?", "mixer 'linear_attention'"],
        id="option-typo-linear",
    ),
    pytest.param(build(colour="red"), TypeError, ["unknown option 'colour'", "its options: ["], id="option-unknown"),
    pytest.param(build("retentoin"), ValueError, ["'retentoin'", "did you mean 'retention'?"], id="mixer-typo"),
    # the backend is checked when the mixer is built, not at its first forward
    pytest.param(
        build(backend="nope"),
        ValueError,
        ["unknown backend 'nope' for mixer 'retention'", "'auto'", "'torch'", "Installed backends:"],
        id="backend-unknown",
    ),
    pytest.param(
        build("softmax_attention", num_heads=3, backend="nope"),
        ValueError,
        ["'nope'", "mixer 'softmax_attention'", "'torch'"],
        id="backend-unknown-softmax",
    ),
    pytest.param(build(backend=3), TypeError, ["backend", "str", "int"], id="backend-int"),
]


@pytest.mark.parametrize(("call", "exc", "fragments"), MIXER_BUILD_CASES)
def test_mixer_construction_rejects_bad_options(call, exc, fragments):
    check_raises(call, exc, fragments)


@pytest.fixture(scope="module")
def mixer():
    return mixers.build("retention", 24, num_heads=3)


def test_mixer_rejects_bad_forward_input(mixer):
    x = torch.randn(2, 5, 24)
    _, state = mixer(x)
    cases = [
        (lambda: mixer(torch.randn(5, 24)), ValueError, ["d_model=24", "[5, 24]"]),
        (lambda: mixer(torch.randn(2, 5, 23)), ValueError, ["d_model=24", "[2, 5, 23]"]),
        (lambda: mixer(torch.ones(2, 5, 24, dtype=torch.int64)), TypeError, ["floating", "int64"]),
        (lambda: mixer(x.tolist()), TypeError, ["torch.Tensor", "list"]),
        (lambda: mixer(torch.randn(3, 5, 24), state), ValueError, ["batch size 2", "batch size 3"]),
        (lambda: mixer(x, state.op), TypeError, ["MixerState", "Tensor"]),
        (lambda: mixer(x, mode="fast"), ValueError, ["'parallel'", "'fast'"]),
        (lambda: mixer(x, mode="chunkwise", chunk_size=0), ValueError, ["chunk_size", "got 0"]),
        (lambda: mixer(x, MixerState.start(state.op.double(), 2, offset=5)), TypeError, ["float32", "float64"]),
        (
            lambda: mixer(x, MixerState.start(state.op[:, :2], 2, offset=5)),
            ValueError,
            ["[2, 3, 8, 16]", "[2, 2, 8, 16]"],
        ),
        (lambda: mixer(x, state.to("meta")), ValueError, ["cpu", "meta"]),
    ]
    for call, exc, fragments in cases:
        check_raises(call, exc, fragments)


def test_an_unavailable_backend_of_a_mixer_fails_at_build():
    """Not at the first forward: the listing says why each backend is unavailable."""
    registry = mixers.get_registry()
    torch_backend = registry.backends["retention"]["torch"]
    unavailable = dataclasses.replace(torch_backend, name="absent", check_available=lambda: "needs the Absent driver")
    with registry.temporary_backend(unavailable):
        check_raises(
            lambda: mixers.build("retention", 24, num_heads=3, backend="absent"),
            ValueError,
            [
                "backend 'absent' for mixer 'retention'",
                "is unavailable: needs the Absent driver",
                "'torch'",
                "available",
            ],
        )
    assert "absent" not in registry.backends["retention"]
    assert mixers.build("retention", 24, num_heads=3, backend="torch").backend == "torch"


def test_a_gamma_tensor_without_grad_is_still_taken():
    q, k, v = q_(), q_(), v_()
    o, _ = functional.retention(q, k, v, torch.full((H,), 0.9).detach(), mode="parallel")
    expected, _ = functional.retention(q, k, v, 0.9, mode="parallel")
    torch.testing.assert_close(o, expected)
