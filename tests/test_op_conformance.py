"""Every available backend of every core op against the float64 references, through the conformance kit.

The same checks plugin authors run on their backends (``mixers.testing.check_op_backend``): every mode with
any chunk size and initial state, any split with the state handed over, gradients, bfloat16 and bad input.
A newly installed backend of a core op is covered here without new test code.
"""

from __future__ import annotations

import pytest

from mixers.testing import conformance as kit

TARGETS = kit.op_targets()


@pytest.mark.parametrize("check", kit.OP_CHECKS, ids=lambda check: check.name)
@pytest.mark.parametrize("target", TARGETS, ids=lambda target: target.id)
def test_op_backend_conformance(target: kit.OpTarget, check: kit.Check):
    try:
        kit.run_check(check, target)
    except kit.CheckNotApplicable as exc:
        pytest.skip(str(exc))


def test_every_core_op_has_a_checked_backend():
    assert {t.spec.op for t in TARGETS} >= {"retention", "linear_attention", "softmax_attention"}
