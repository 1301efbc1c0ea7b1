"""seqmixers-conv: the conformance kit on the mixer and the op, plus what is particular to a short convolution.

The two assignments below are the whole conformance suite: one test per check, backend and mode.
"""

from __future__ import annotations

import mixers
import pytest
import torch
import torch.nn.functional as F
from mixers.testing import assert_rel_close, check_op_backend, mixer_conformance_tests, op_conformance_tests

if "short_conv" not in mixers.get_registry().mixers:  # the entry point is read from installed metadata
    pytest.skip("seqmixers-conv is not installed: pip install -e plugins/seqmixers-conv", allow_module_level=True)

from mixers import MixerState  # noqa: E402

from seqmixers_conv import ShortConvolution, short_conv  # noqa: E402
from seqmixers_conv.testing import SHORT_CONV_SPEC, ShortConvCase, short_conv_reference  # noqa: E402

test_short_conv_mixer = mixer_conformance_tests("short_conv")
test_short_conv_op = op_conformance_tests(SHORT_CONV_SPEC)


def test_registered_through_the_entry_point_only():
    """The mixer and its backend come from this distribution's entry point, not from the core."""
    registry = mixers.get_registry()
    spec = registry.mixers["short_conv"]
    assert spec.ops == ("short_conv",) and spec.factory is ShortConvolution
    info = registry.plugins[spec.plugin]
    assert not info.builtin and info.distribution == "seqmixers-conv" and info.ok, info
    assert registry.backends["short_conv"]["torch"].plugin == spec.plugin
    assert mixers.available()["short_conv"] == ["torch"]


def test_reference_is_the_convolution():
    """The reference equals torch's own causal conv1d (left zero padding) on a small input."""
    gen = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(2, 7, 3, generator=gen), torch.randn(3, 4, generator=gen), torch.randn(3, generator=gen)
    expected = F.conv1d(F.pad(x.transpose(1, 2), (3, 0)), w[:, None], b, groups=3).transpose(1, 2)
    y, state = short_conv_reference(x, w, b)
    torch.testing.assert_close(y, expected.double())
    torch.testing.assert_close(state, x[:, -3:].double())


@pytest.mark.parametrize("mode", ["parallel", "chunkwise", "recurrent"])
@pytest.mark.parametrize(("T", "K"), [(10, 4), (2, 4), (0, 4), (5, 1)])
def test_state_is_the_last_k_minus_1_inputs(mode, T, K):
    """Shorter inputs than the window keep the older part of the state; K = 1 has an empty state."""
    case = ShortConvCase(B=2, T=T, C=3, K=K, with_bias=True, chunk_size=3, with_state=True, seed=1)
    inputs = case.inputs()
    x, window = inputs.seq["x"], inputs.state
    y, state = short_conv(x, **inputs.const, mode=mode, chunk_size=3, initial_state=window)
    assert state.shape == (2, K - 1, 3) and y.shape == (2, T, 3)
    assert torch.equal(state, torch.cat([window, x], dim=1)[:, T:])


def test_bad_arguments_are_rejected_clearly():
    x, w = torch.randn(2, 5, 3), torch.randn(3, 4)
    cases = [
        (lambda: short_conv(x[0], w, mode="parallel"), "x must be a floating-point tensor [B, T, C]"),
        (lambda: short_conv(x, w[:2], mode="parallel"), "weight must be [C, K] with C = 3"),
        (lambda: short_conv(x, w, torch.zeros(4), mode="parallel"), "bias must have shape [3]"),
        (lambda: short_conv(x, w.double(), mode="parallel"), "weight must have dtype torch.float32"),
        (lambda: short_conv(x, w, mode="parallel", initial_state=torch.zeros(2, 4, 3)), "shape [2, 3, 3]"),
        (lambda: short_conv(x, w, mode="sideways"), "'sideways'"),
        (lambda: short_conv(x, w, mode="parallel", backend="nope"), "unknown backend 'nope'"),
        (lambda: ShortConvolution(8, kernel_size=0), "kernel_size must be a positive int"),
        (lambda: ShortConvolution(8, activation="tanh"), "activation must be one of"),
        (lambda: ShortConvolution(8)(torch.randn(1, 3, 8), MixerState.start(torch.zeros(2, 3, 8), 2)), "batch size 2"),
    ]
    for call, fragment in cases:
        with pytest.raises((ValueError, TypeError)) as info:
            call()
        assert fragment in str(info.value), (fragment, str(info.value))


def test_the_kit_catches_a_wrong_backend_of_this_op():
    """The op's spec is sharp: a backend that drops the bias in chunkwise mode fails, with its counterexample."""
    registry = mixers.get_registry()
    good = registry.backends["short_conv"]["torch"]

    def no_bias_in_chunks(x, weight, bias, *, mode, chunk_size, initial_state):
        return good.fn(x, weight, None if mode == "chunkwise" else bias, mode=mode, chunk_size=chunk_size,
                       initial_state=initial_state)  # fmt: skip

    with registry.temporary_backend("short_conv", "wrong", no_bias_in_chunks), pytest.raises(AssertionError) as info:
        check_op_backend(SHORT_CONV_SPEC, "wrong", checks=["matches_reference"])
    message = str(info.value)
    (example,) = info.value.counterexamples  # the kit's own report, whatever hypothesis's version prints
    assert (example.check, example.mode) == ("matches_reference", "chunkwise"), example
    assert str(example) in message and "mode 'chunkwise': output" in message
    case = dict(example.inputs)["case"]
    assert case.with_bias and case.T == 1, case  # shrunk to the smallest input


def test_usable_by_name_in_a_hybrid_model_config():
    """A model config names the plugin's mixer like a built-in; the hybrid's modes agree and states hand over."""
    from models.config import ModelConfig
    from models.lm import build_model

    config = ModelConfig(
        vocab_size=32, d_model=16, n_layers=2, layers=[{"mixer": "short_conv", "kernel_size": 3}, "retention"],
        mixer_options={"retention": {"num_heads": 2}},
    )  # fmt: skip
    assert [spec.mixer for spec in config.layer_specs()] == ["short_conv", "retention"]
    torch.manual_seed(0)
    model = build_model(config).double()
    tokens = torch.randint(0, 32, (2, 9))
    logits, _ = model(tokens, mode="parallel")
    first, states = model(tokens[:, :4], mode="chunkwise", chunk_size=2)
    rest, _ = model(tokens[:, 4:], states, mode="recurrent")
    assert isinstance(states[0].op, torch.Tensor) and states[0].offset == 4
    assert_rel_close(torch.cat([first, rest], dim=1), logits, 1e-10, "split hybrid logits")


def test_the_op_is_registered_and_the_kit_finds_its_spec_by_name():
    """The plugin's ``Op`` is in the registry, so ``op_conformance_tests("short_conv")`` works like a core op's."""
    from mixers.testing.ops import get_op_spec

    from seqmixers_conv.op import SHORT_CONV

    assert mixers.get_registry().ops["short_conv"].prepare is SHORT_CONV.prepare
    assert get_op_spec("short_conv") is SHORT_CONV_SPEC
