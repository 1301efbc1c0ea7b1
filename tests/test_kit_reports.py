"""The conformance kit's reports read cleanly (issue 21, item 19).

A failed check is reported in the kit's words alone, a few lines each, in the in-suite form
(``op_conformance_tests``, ``mixer_conformance_tests``) as in the ``--seqmixers-conformance`` form: the in-suite
form used to print the kit's and hypothesis's frames, 700 to 1000 lines for 13 failures. Each check's
description is its whole first sentence (it was cut at "w.r.t."), and the empty-input message names the state
it compares.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

from mixers import get_registry
from mixers.backends import torch_retention
from mixers.testing import conformance as kit
from tests.fake_plugins import write_wrong_distribution
from tests.test_plugin_kit import _env, assert_no_hypothesis_report


def test_a_failed_check_is_a_few_lines_in_both_forms(tmp_path):
    """``off_by_one`` (every output gamma times the right one) fails the comparisons with the reference, in the
    test module's generated tests and in the command line's."""
    write_wrong_distribution(tmp_path)
    (tmp_path / "conftest.py").write_text(
        textwrap.dedent("""
            from hypothesis import settings
            settings.register_profile("kit", max_examples=10, deadline=None, derandomize=True)
            settings.load_profile("kit")
        """)
    )
    (tmp_path / "test_mine.py").write_text(
        textwrap.dedent("""
            from mixers.testing import mixer_conformance_tests, op_conformance_tests
            test_op = op_conformance_tests("retention", ["off_by_one"])
            test_mixer = mixer_conformance_tests("retention", ["off_by_one"])
        """)
    )
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-W", "error", "test_mine.py"]
    command += ["--seqmixers-conformance=retention:off_by_one", "-k", "matches_reference or gradients"]
    result = subprocess.run(command, cwd=tmp_path, env=_env(str(tmp_path)), capture_output=True, text=True, timeout=300)
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    failed = [line for line in out.splitlines() if line.startswith("FAILED")]
    in_suite = [line for line in failed if "test_mine.py::" in line]
    assert len(in_suite) == 3 and len(failed) == 6, out  # matches_reference, gradients, matches_reference_backend
    sections = re.split(r"^_+ .* _+$", out.split("short test summary info")[0], flags=re.M)[1:]
    assert len(sections) == 6, out
    for section in sections:
        lines = section.strip().splitlines()
        assert 2 <= len(lines) <= 4, section  # the check and its description, how it failed, the counterexample
        assert "failed (" in lines[0] and ("counterexample: check" in section or "backend 'torch'" in section)
    assert "Traceback" not in out and ".py:" not in out.split("short test summary info")[0], out
    assert_no_hypothesis_report(out)


def test_check_descriptions_are_whole_first_sentences():
    docs = {check.name: check.doc for check in (*kit.MIXER_CHECKS, *kit.OP_CHECKS)}
    assert (
        docs["gradients_agree"] == "Gradients w.r.t. the input and every parameter agree between modes and a split run."
    )
    assert docs["gradients"].startswith("Gradients w.r.t. the inputs and the initial state match")
    for name, doc in docs.items():
        assert doc.endswith(".") and not doc.endswith(("w.r.t.", "e.g.", "i.e.")) and len(doc) > 30, (name, doc)


def test_the_empty_input_failure_names_the_state_it_compares():
    """A backend that changes the state on an empty input fails ``empty_input_keeps_the_state`` with a message
    that reads as a path into the mixer's state (it read "state after an empty input.op")."""

    def moves_on_empty(q, k, v, gamma, **kwargs):
        o, state = torch_retention.retention(q, k, v, gamma, **kwargs)
        return o, state + 1 if q.shape[1] == 0 else state

    with get_registry().temporary_backend("retention", "moves_on_empty", moves_on_empty, plugin="tests"):
        target = kit.mixer_target("retention", "moves_on_empty")
        check = next(c for c in kit.MIXER_CHECKS if c.name == "empty_input_keeps_the_state")
        try:
            kit.run_check(check, target)
        except kit.ConformanceError as exc:
            message = str(exc)
        else:
            raise AssertionError("a state changed by an empty input passed")
    assert "parallel, an empty input: the state.op: relative error" in message, message
    assert "input.op" not in message
