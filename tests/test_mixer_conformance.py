"""Conformance suite: every registered mixer, with every available backend of its ops, honours the
``TokenMixer`` contract. A newly registered mixer or backend (an installed plugin's included) is covered
without new test code.

The checks live in the conformance kit (``mixers.testing.conformance``), the same functions plugin authors
run on their own mixers. Properties: the three modes agree (chunkwise with chunk sizes that do and don't
divide T), any split with state hand-over equals one pass (in mixed modes), gradients w.r.t. the input and
the parameters agree between modes, causality (also of NaN and inf inputs), batch independence, beam-search
reordering, the empty history, bfloat16, the reference backend's outputs, dtype/shape preservation, and
clear errors on bad input.
"""

from __future__ import annotations

import inspect
import sys

import pytest

from mixers.testing import conformance as kit
from mixers.testing.strategies import MODES

CHECKS = {check.name: check for check in kit.MIXER_CHECKS}
# The recurrent mixers' short convolution on q, k, v adds a window to the state: it is checked as a mixer of its own.
CONV_TARGETS = [kit.mixer_target(name, "torch", options={"conv_size": 4}) for name in ("linear_attention", "retention")]
TARGETS = kit.mixer_targets() + CONV_TARGETS
per_target = pytest.mark.parametrize("target", [pytest.param(t, id=t.id) for t in TARGETS])


def run(name: str, target: kit.MixerTarget, mode: str | None = None) -> None:
    """Run the kit's check ``name`` on ``target``; a check that does not apply is a skip that says why."""
    if mode is not None and mode not in target.modes:
        pytest.skip(f"backend {target.backend!r} does not compute mode {mode!r}")
    try:
        kit.run_check(CHECKS[name], target, mode)
    except kit.CheckNotApplicable as exc:
        pytest.skip(str(exc))


@per_target
def test_mixer_has_an_available_backend(target):
    run("available", target)


@per_target
def test_modes_agree(target):
    run("modes_agree", target)


@per_target
def test_modes_agree_in_float32(target):
    run("modes_agree_float32", target)


@per_target
def test_any_split_equals_one_pass(target):
    run("split_equals_one_pass", target)


@per_target
def test_empty_input_keeps_the_state(target):
    run("empty_input_keeps_the_state", target)


@per_target
def test_gradients_agree_between_modes(target):
    run("gradients_agree", target)


@per_target
@pytest.mark.parametrize("mode", MODES)
def test_causality(target, mode):
    run("causality", target, mode)


@per_target
@pytest.mark.parametrize("mode", MODES)
def test_nonfinite_input_stays_causal(target, mode):
    run("nonfinite_stays_causal", target, mode)


@per_target
@pytest.mark.parametrize("mode", MODES)
def test_batch_independence(target, mode):
    run("batch_independence", target, mode)


@per_target
def test_reordered_state_follows_its_batch_entries(target):
    run("reordered_state", target)


@per_target
def test_init_state_is_the_empty_history(target):
    run("init_state", target)


@per_target
@pytest.mark.parametrize("mode", MODES)
def test_bfloat16_within_2e_2_of_float64(target, mode):
    run("low_precision", target, mode)


COMPARED = [t for t in TARGETS if CHECKS["matches_reference_backend"].applies_to(t)]
if COMPARED:  # with only the reference backend installed there is nothing to compare it with

    @pytest.mark.parametrize("target", [pytest.param(t, id=t.id) for t in COMPARED])
    def test_same_outputs_as_the_reference_backend(target):
        run("matches_reference_backend", target)


@per_target
def test_rejects_bad_input(target):
    run("rejects_bad_input", target)


def test_every_kit_check_runs_here():
    """A check added to the kit is run by this suite too."""
    source = inspect.getsource(sys.modules[__name__])
    missing = [name for name in CHECKS if f'run("{name}"' not in source]
    assert not missing, f"kit checks not run by this suite: {missing}"
