"""Conformance suite: every mixer of the built-in plugins, with every available backend of its ops, honours the
``TokenMixer`` contract. A newly registered built-in mixer or backend, or a new kit check, is covered without new
test code: the cases are the kit's own (``check_cases``).

The checks live in the conformance kit (``mixers.testing.conformance``), the same functions plugin authors
run on their own mixers. Properties: the three modes agree (chunkwise with chunk sizes that do and don't
divide T), any split with state hand-over equals one pass (in mixed modes), gradients w.r.t. the input and
the parameters agree between modes, causality (also of NaN and inf inputs), batch independence, beam-search
reordering, the empty history, bfloat16, the reference backend's outputs, dtype/shape preservation, and
clear errors on bad input.

The suite runs on a registry of the built-in plugins only (as ``SEQMIXERS_PLUGINS=""`` loads it), so what it
checks does not depend on what is installed; installed plugins are checked by their own suites.
"""

from __future__ import annotations

import pytest

from mixers.testing import conformance as kit

BUILTIN = kit.builtin_registry()
with kit.using_registry(BUILTIN):
    # The recurrent mixers' short convolution on q, k, v adds a window to the state: checked as a mixer of its own.
    CONV_TARGETS = [
        kit.mixer_target(name, "torch", options={"conv_size": 4}) for name in ("linear_attention", "retention")
    ]
    TARGETS = kit.mixer_targets() + CONV_TARGETS
    CASES = kit.check_cases(TARGETS, kit.MIXER_CHECKS)


@pytest.fixture(autouse=True)
def _builtin_plugins_only():
    with kit.using_registry(BUILTIN):
        yield


@pytest.mark.parametrize("case", [pytest.param(case, id=case.id) for case in CASES])
def test_mixer_conformance(case: kit.CheckCase):
    try:
        kit.run_check(case.check, case.target, case.mode)
    except kit.CheckNotApplicable as exc:
        pytest.skip(str(exc))


def test_targets_are_the_builtin_mixers_only():
    """Every built-in mixer is checked with each available backend and "auto", and nothing an installed plugin
    brings is: the targets do not change with what is installed."""
    builtin = {name for name, spec in BUILTIN.mixers.items() if BUILTIN.is_builtin(spec.plugin)}
    assert {t.name for t in TARGETS} == builtin == set(BUILTIN.mixers)
    for name, backends in BUILTIN.available().items():
        assert {t.backend for t in TARGETS if t.name == name} == {*backends, "auto"}, name


def test_every_check_runs_on_every_target_and_mode():
    """Each kit check runs on each target it applies to, in each mode the target computes (a per-mode check)."""
    collected = {(case.check.name, case.target.id, case.mode) for case in CASES}
    for target in TARGETS:
        for check in kit.MIXER_CHECKS:
            if check.applies is None:
                for mode in target.modes if check.per_mode else (None,):
                    assert (check.name, target.id, mode) in collected, (check.name, target.id, mode)
    assert len({case.id for case in CASES}) == len(CASES), "two cases share an id"
    assert {t.id for t in CONV_TARGETS} <= {case.target.id for case in CASES}
