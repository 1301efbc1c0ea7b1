"""Every available backend of every core op against the float64 references, through the conformance kit.

The same checks plugin authors run on their backends (``mixers.testing.check_op_backend``): every mode with
any chunk size and initial state, any split with the state handed over, gradients, bfloat16 and non-finite
inputs. A newly installed built-in backend of a core op is covered here without new test code. The op's
validation (``rejects_bad_input``) is checked once per op, not per backend: the public op rejects bad input
before any backend runs. The suite runs on the built-in plugins only, like ``test_mixer_conformance.py``.
"""

from __future__ import annotations

import pytest

from mixers.testing import conformance as kit

BUILTIN = kit.builtin_registry()
with kit.using_registry(BUILTIN):
    TARGETS = kit.op_targets()
    CASES = kit.check_cases(TARGETS, kit.OP_CHECKS)


@pytest.fixture(autouse=True)
def _builtin_plugins_only():
    with kit.using_registry(BUILTIN):
        yield


@pytest.mark.parametrize("case", [pytest.param(case, id=case.id) for case in CASES])
def test_op_conformance(case: kit.CheckCase):
    try:
        kit.run_check(case.check, case.target, case.mode)
    except kit.CheckNotApplicable as exc:
        pytest.skip(str(exc))


def test_every_core_op_has_a_checked_backend():
    assert {t.spec.op for t in TARGETS} >= {"retention", "linear_attention", "softmax_attention"}


def test_backend_checks_run_per_backend_and_op_checks_once_per_op():
    ops = {t.spec.op for t in TARGETS}
    for check in kit.OP_CHECKS:
        ran = [case.target for case in CASES if case.check is check]
        if check.per_op:
            assert sorted(t.spec.op for t in ran) == sorted(ops), check.name
        else:
            assert sorted(t.id for t in ran) == sorted(t.id for t in TARGETS), check.name
