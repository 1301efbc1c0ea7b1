"""Every available backend of every core op against the float64 references, through the conformance kit.

The same checks plugin authors run on their backends (``mixers.testing.check_op_backend``): every mode with
any chunk size and initial state, any split with the state handed over, gradients, bfloat16 and non-finite
inputs. A newly installed built-in backend of a core op is covered here without new test code. The op's
validation (``rejects_bad_input``) is checked once per op, not per backend: the public op rejects bad input
before any backend runs. The suite runs on the built-in plugins only, like ``test_mixer_conformance.py``.
"""

from __future__ import annotations

import pytest
import torch

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


def _leaky(q, k, v, gamma, *, mode, chunk_size, initial_state, cu_seqlens=None):
    """A backend that says it packs but runs the packed row as one sequence: states cross the boundaries."""
    from mixers.backends.torch_retention import retention

    o, s = retention(q, k, v, gamma, mode=mode, chunk_size=chunk_size, initial_state=None)
    return o, s.expand(cu_seqlens.n, *s.shape[1:]).contiguous() if cu_seqlens is not None else s


def test_the_packed_check_catches_a_backend_whose_packing_leaks_across_sequences():
    with BUILTIN.temporary_backend("retention", "leaky", _leaky, packs=True, plugin="leaky-plugin"):
        target = kit.op_target("retention", "leaky", dtypes=[torch.float64])
        with pytest.raises(kit._PropertyFailed, match="as registered, mode"):
            kit.check_op_packed_equals_separate(target, max_examples=20)
        with kit.per_sequence(["retention"], BUILTIN):  # the loop path gives each row its own state: it passes
            assert not BUILTIN.backends["retention"]["leaky"].packs
