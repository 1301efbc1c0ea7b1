"""Third-party plugins and the conformance kit: broken plugins are reported while the others load, and the
kit catches backends that compute a wrong answer, with the shrunk counterexample reported in the kit's own
words (never hypothesis's, which change between its versions).

The plugins come from a fake distribution on ``sys.path`` (``tests/fake_plugins.py``), found through the
``seqmixers`` entry-point group exactly as an installed package is.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import mixers
from mixers import registry as registry_module
from mixers.functional import MODES
from mixers.listing import format_listing
from mixers.plugins import PluginLoadError
from mixers.registry import Registry
from mixers.testing import ConformanceError, check_mixer, check_op_backend
from mixers.testing import conformance as kit
from mixers.testing.ops import OP_SPECS, OpSpec
from tests.fake_plugins import (
    AGAIN_DISTRIBUTION,
    WRONG_DISTRIBUTION,
    WRONG_VERSION,
    forget_wrong_modules,
    write_wrong_distribution,
)


@pytest.fixture
def wrong_dist(tmp_path, monkeypatch):
    write_wrong_distribution(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("SEQMIXERS_PLUGINS", raising=False)
    monkeypatch.delenv("SEQMIXERS_STRICT_PLUGINS", raising=False)
    yield tmp_path
    forget_wrong_modules()


@pytest.fixture
def wrong_registry(wrong_dist, monkeypatch) -> Registry:
    """The process registry, with the wrong distribution's plugins loaded next to everything installed."""
    registry = Registry().load()
    monkeypatch.setattr(registry_module, "_REGISTRY", registry)
    return registry


def test_broken_plugins_are_reported_and_the_others_load(wrong_registry):
    plugins = wrong_registry.plugins
    broken = {"wrong_import": "RuntimeError: plugin exploded at import", "wrong_malformed": "priority must be an int"}
    for name, fragment in broken.items():
        info = plugins[name]
        assert not info.ok and (info.distribution, info.version) == (WRONG_DISTRIBUTION, WRONG_VERSION)
        assert fragment in "\n".join(info.errors), info.errors
    assert "malformed" not in wrong_registry.backends["retention"]
    assert plugins["wrong_answers"].ok
    assert {"torch", "off_by_one", "ragged_chunks"} <= set(wrong_registry.backends["retention"])
    listing = format_listing(wrong_registry)
    for name in broken:
        line = next(line for line in listing.splitlines() if line.strip().startswith(name + " "))
        assert f"distribution {WRONG_DISTRIBUTION} {WRONG_VERSION}" in line and line.rstrip().endswith("BROKEN")
    assert (
        "retention/off_by_one" in listing and f"plugin: wrong_answers [{WRONG_DISTRIBUTION} {WRONG_VERSION}]" in listing
    )


def test_strict_mode_stops_at_the_first_broken_plugin(wrong_dist, monkeypatch):
    monkeypatch.setenv("SEQMIXERS_STRICT_PLUGINS", "1")
    monkeypatch.setenv("SEQMIXERS_PLUGINS", "wrong_import")
    with pytest.raises(PluginLoadError, match=f"'wrong_import' \\(distribution {WRONG_DISTRIBUTION}\\).*exploded"):
        Registry().load()


def test_two_plugins_registering_one_backend_name_is_an_error_naming_both(tmp_path, monkeypatch):
    """A second distribution registers the same backend names: an error that names both plugins and
    distributions; the first registration stays, the other plugins load."""
    write_wrong_distribution(tmp_path, again=True)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("SEQMIXERS_PLUGINS", "wrong_answers,wrong_again")
    monkeypatch.delenv("SEQMIXERS_STRICT_PLUGINS", raising=False)
    try:
        registry = Registry().load()
    finally:
        forget_wrong_modules()
    both = {"wrong_answers": WRONG_DISTRIBUTION, "wrong_again": AGAIN_DISTRIBUTION}
    (second,) = [name for name in both if not registry.plugins[name].ok]
    (first,) = [name for name in both if name != second]
    message = "\n".join(registry.plugins[second].errors)
    for fragment in (
        "backend 'off_by_one' for op 'retention' is already registered by plugin",
        f"'{first}' (distribution {both[first]} ",
        f"(from plugin '{second}' (distribution {both[second]} ",
        "is ignored",
    ):
        assert fragment in message, (fragment, message)
    assert registry.backends["retention"]["off_by_one"].plugin == first
    assert "torch" in registry.backends["retention"]


def assert_no_hypothesis_report(text: str) -> None:
    """The kit reports counterexamples itself: none of hypothesis's own report wordings (old or new) leak in."""
    for wording in ("Falsifying example", "Failing test case", "Trying example", "@reproduce_failure"):
        assert wording not in text, f"hypothesis's own report {wording!r} in the kit's message:\n{text}"


def _small(message: str, field: str, most: int) -> bool:
    values = [int(v) for v in re.findall(rf"\b{field}=(\d+)", message)]
    return bool(values) and max(values) <= most


CONSISTENT_BUT_WRONG = ["modes_agree", "split_equals_one_pass", "matches_reference_backend"]


def test_kit_catches_a_consistently_wrong_backend_with_a_shrunk_counterexample(wrong_registry):
    """``off_by_one`` agrees with itself across modes and splits; only the references can catch it."""
    with pytest.raises(AssertionError) as info:
        check_op_backend("retention", "off_by_one", checks=["matches_reference", "handover"], max_examples=20)
    message = str(info.value)
    assert isinstance(info.value, ConformanceError)
    assert "backend 'off_by_one' of op 'retention'" in message and "check 'matches_reference' failed" in message
    examples = {example.check: example for example in info.value.counterexamples}
    assert set(examples) == {"matches_reference", "handover"}, info.value.counterexamples
    assert examples["handover"].mode == "split" and examples["matches_reference"].mode in MODES
    for example in examples.values():
        line = f"  counterexample: check {example.check!r}, mode {example.mode!r}: "
        assert line in message and str(example) in message and "RetentionCase(" in str(example), message
    assert_no_hypothesis_report(message)
    for field, most in (("B", 1), ("T", 1), ("H", 1), ("Dk", 1), ("Dv", 1)):
        assert _small(message, field, most), f"{field} not shrunk in:\n{message}"
    with pytest.raises(ConformanceError) as info:
        check_mixer(
            "retention", "off_by_one", checks=["modes_agree", "split_equals_one_pass", "matches_reference_backend"]
        )
    message = str(info.value)
    assert "failed 1 of 3" in message and "'matches_reference_backend'" in message and "vs backend 'torch'" in message


def test_kit_catches_a_backend_wrong_only_for_some_chunk_sizes(wrong_registry):
    with pytest.raises(ConformanceError) as info:
        check_op_backend("retention", "ragged_chunks", checks=["matches_reference"], max_examples=50)
    message = str(info.value)
    (example,) = info.value.counterexamples
    assert (example.check, example.mode) == ("matches_reference", "chunkwise"), example
    assert str(example) in message and "mode 'chunkwise': output" in message
    assert_no_hypothesis_report(message)
    case = dict(example.inputs)["case"]
    T, chunk = case.T, case.chunk_size
    assert T % chunk and T > chunk and T <= 4, f"expected a small T not divisible by the chunk size:\n{message}"
    with pytest.raises(ConformanceError, match="modes_agree"):
        check_mixer("retention", "ragged_chunks", checks=["modes_agree"])
    check_op_backend("retention", "torch", checks=["matches_reference"], max_examples=10)  # the right one passes


def test_unknown_names_are_clear_errors():
    with pytest.raises(ValueError, match="unknown mixer 'nope'; registered mixers:"):
        check_mixer("nope")
    with pytest.raises(ValueError, match="no backend 'nope' serves mixer 'retention'"):
        check_mixer("retention", "nope")
    with pytest.raises(ValueError, match="no backend 'nope' is registered for op 'retention'"):
        check_op_backend("retention", "nope")
    with pytest.raises(ValueError, match="the kit has no spec for op 'conv'"):
        check_op_backend("conv", "torch")
    with pytest.raises(ValueError, match="unknown checks \\['speed'\\]"):
        check_mixer("retention", "torch", checks=["speed"])


def test_an_unavailable_backend_is_reported_not_failed(monkeypatch):
    registry = mixers.get_registry()
    if (
        "cupy" not in registry.backends["retention"]
        or registry.unavailable_reason(registry.backends["retention"]["cupy"]) is None
    ):
        pytest.skip("the cupy backend is available here")
    with pytest.raises(kit.BackendUnavailable, match="retention/cupy is unavailable: "):
        check_op_backend("retention", "cupy")


def _env(pythonpath: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SEQMIXERS_", "HYPOTHESIS_", "PYTEST_"))}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, env.get("PYTHONPATH")) if p)
    return env


def test_pytest_plugin_runs_the_suite_from_the_command_line(tmp_path):
    """``pytest --seqmixers-conformance=retention:BACKEND``: the right backend passes, the wrong one fails with
    its counterexample, each check its own test."""
    write_wrong_distribution(tmp_path)
    (tmp_path / "conftest.py").write_text(
        textwrap.dedent("""
            from hypothesis import settings
            settings.register_profile("kit", max_examples=10, deadline=None, derandomize=True)
            settings.load_profile("kit")
        """)
    )
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfs", "-W", "error"]
    command += ["-k", "matches_reference or modes_agree or causality"]
    specs = ["--seqmixers-conformance=retention:torch", "--seqmixers-conformance=retention:off_by_one"]
    result = subprocess.run(
        [*command, *specs], cwd=tmp_path, env=_env(str(tmp_path)), capture_output=True, text=True, timeout=300
    )
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    failed = [line for line in out.splitlines() if line.startswith("FAILED")]
    assert failed and all("off_by_one" in line for line in failed), out
    assert any("op-retention-off_by_one-matches_reference" in line for line in failed), out
    assert any("retention-off_by_one-matches_reference_backend" in line for line in failed), out
    assert "counterexample: check 'matches_reference', mode " in out and "RetentionCase(B=1, T=1," in out, out
    assert_no_hypothesis_report(out)
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped)", out)}
    # retention:torch passes modes_agree (x2), causality (x3) and the op's matches_reference (its comparison
    # with itself is not generated); off_by_one, consistent with itself, passes the first five and fails the others.
    assert counts == {"passed": 11, "failed": 2}, out


def test_naming_a_backend_keeps_the_op_level_checks():
    """``--seqmixers-conformance=retention:other`` checks that backend only, so the op's own checks
    (``rejects_bad_input``) run on it, though another backend (torch) would represent the op otherwise."""
    from mixers.backends import torch_retention
    from mixers.testing.pytest_plugin import _cases, _option_targets

    with mixers.get_registry().temporary_backend("retention", "other", torch_retention.retention, plugin="tests"):
        names = {}
        for spec in ("retention:other", "retention"):
            found = [(ident, target, checks) for ident, _, target, checks in _option_targets(spec)]
            op_other = [(i, t, c) for i, t, c in found if i == "op-retention-other"]
            assert op_other, found
            ident, target, checks = op_other[0]
            names[spec] = {check.name for _, check, _ in _cases(target, checks, None, named=":" in spec)}
    assert "rejects_bad_input" in names["retention:other"]
    assert "rejects_bad_input" not in names["retention"]  # all backends: it runs once, on torch


def test_pytest_plugin_rejects_an_unknown_name(tmp_path):
    from mixers.testing.pytest_plugin import _option_targets

    with pytest.raises(pytest.UsageError, match="'nope' is neither a registered mixer"):
        _option_targets("nope")
    with pytest.raises(pytest.UsageError, match="no backend 'nope' serves mixer 'retention'"):
        _option_targets("retention:nope")


def test_import_mixers_loads_neither_hypothesis_nor_pytest():
    code = (
        "import sys, mixers, mixers.testing\n"
        "assert not {'hypothesis', 'pytest'} & set(sys.modules), sorted({'hypothesis', 'pytest'} & set(sys.modules))\n"
        "mixers.testing.check_mixer\n"
        "assert 'hypothesis' in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr


def test_kit_checks_leave_the_global_torch_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    kit.mixer_target("retention", "torch").build()
    kit._fresh_build(kit.mixer_target("retention", "torch"), torch.float64, "torch")
    assert torch.equal(torch.rand(3), expected)


def _property_check(name: str, prop, **strategies) -> kit.Check:
    return kit.Check(
        name, lambda target, max_examples=None: kit._property(prop, max_examples or 200, **strategies), hypothesis=True
    )


def test_the_kit_reports_the_shrunk_input_in_its_own_words():
    """The counterexample is recorded from the property's own calls (hypothesis replays the shrunk one last),
    not parsed from hypothesis's report: a property false from 10 on is reported at exactly x=10."""
    from hypothesis import strategies as st

    def below_ten(x, label):
        kit._at("chunkwise")
        assert x < 10, f"x = {x}"

    check = _property_check("below_ten", below_ten, x=st.integers(0, 10**6), label=st.text(max_size=3))
    with pytest.raises(ConformanceError) as info:
        kit.run_check(check, kit.op_target("retention", "torch"))
    (example,) = info.value.counterexamples
    assert example == kit.Counterexample("below_ten", "chunkwise", (("x", 10), ("label", ""))), example
    message = str(info.value)
    assert "check 'below_ten' failed" in message and "  x = 10\n" in message, message
    assert message.endswith("\n  counterexample: check 'below_ten', mode 'chunkwise': x=10, label=''"), message
    assert_no_hypothesis_report(message)


def test_a_check_that_fails_once_and_then_passes_is_reported_as_not_deterministic():
    """A backend that answers differently for the same input (hypothesis calls this flaky) gets the kit's
    explanation and the input it failed on, not hypothesis's wording."""
    from hypothesis import strategies as st

    calls = []

    def fails_only_the_first_time(x):
        calls.append(x)
        assert len(calls) > 1, "wrong the first time"

    check = _property_check("first_call", fails_only_the_first_time, x=st.integers(0, 3))
    with pytest.raises(ConformanceError) as info:
        kit.run_check(check, kit.op_target("retention", "torch"))
    message = str(info.value)
    assert "does not compute the same result twice" in message and "wrong the first time" in message, message
    (example,) = info.value.counterexamples
    assert example.inputs == (("x", calls[0]),) and example.mode is None, example
    assert "unreliable" not in message.lower() and "flaky" not in message.lower(), message
    assert_no_hypothesis_report(message)


# -- op-level checks -------------------------------------------------------------------------------------
def _retention_spec_of(op: str, call) -> OpSpec:
    """The retention op's spec under another op name, called through ``call``, with the standard bad inputs."""
    return dataclasses.replace(OP_SPECS["retention"], op=op, call=call, bad_inputs=None)


def _with_backend(registry: Registry, op: str, name: str, fn) -> Registry:
    registry.backends.setdefault(op, {})[name] = mixers.Backend(op=op, name=name, fn=fn, plugin="tests")
    return registry


def test_rejects_bad_input_fails_an_op_whose_errors_do_not_name_the_problem():
    """An op whose validation raises, but vaguely, fails: each bad input must be named in its error (what was
    expected, what was given). The old check accepted any message for a bad state, and this one's mentions the
    unknown mode as it asked."""
    retention_call = OP_SPECS["retention"].call

    def vague(seq, const, state, *, mode, chunk_size, backend):
        try:
            return retention_call(seq, const, state, mode=mode, chunk_size=chunk_size, backend=backend)
        except (ValueError, TypeError):
            raise ValueError(f"vague_retention: invalid arguments (mode {mode!r})") from None

    registry = _with_backend(kit.builtin_registry(), "vague_retention", "torch", lambda *a, **k: None)
    check = {c.name: c for c in kit.OP_CHECKS}["rejects_bad_input"]
    with kit.using_registry(registry):
        with pytest.raises(ConformanceError) as info:
            kit.run_check(check, kit.op_target(_retention_spec_of("vague_retention", vague), "torch"), max_examples=3)
        message = str(info.value)
        assert 'vague_retention: an unknown mode: error ValueError("vague_retention: invalid arguments' in message
        assert "does not mention [\"'parallel'\"]" in message, message
        # The same op with the core's own errors passes.
        kit.run_check(check, kit.op_target(_retention_spec_of("vague_retention", retention_call), "torch"))


def test_an_op_level_check_runs_once_per_op_whatever_its_backends():
    """rejects_bad_input checks the op's validation, which runs before any backend: an all-zeros backend would
    pass it, so it is generated once per op (on the reference backend), while the backend checks run on each."""

    def zeros(q, k, v, gamma, *, mode, chunk_size, initial_state):
        B, _, H, Dk = q.shape
        return torch.zeros_like(v), q.new_zeros(
            B, H, Dk, v.shape[-1], dtype=torch.promote_types(q.dtype, torch.float32)
        )

    registry = _with_backend(kit.builtin_registry(), "retention", "zeros", zeros)
    with kit.using_registry(registry):
        targets = kit.op_targets(["retention"])
        assert [t.backend for t in targets] == ["torch", "zeros"]
        cases = kit.check_cases(targets)
        assert [c.id for c in cases if c.check.per_op] == ["retention-rejects_bad_input"]
        assert [c.target.backend for c in cases if c.check.per_op] == ["torch"]
        assert {c.target.backend for c in cases if c.check.name == "matches_reference"} == {"torch", "zeros"}
        check = {c.name: c for c in kit.OP_CHECKS}["rejects_bad_input"]
        kit.run_check(check, kit.op_target("retention", "zeros"), max_examples=2)  # it is not about the backend
        with pytest.raises(ConformanceError, match="check 'matches_reference' failed"):
            kit.run_check(kit.OP_CHECKS[0], kit.op_target("retention", "zeros"), max_examples=5)


def test_using_registry_swaps_the_process_registry_for_a_block():
    before = mixers.get_registry()
    builtin = kit.builtin_registry()
    with kit.using_registry(builtin):
        assert mixers.get_registry() is builtin
        assert all(info.builtin for info in builtin.plugins.values())
    assert mixers.get_registry() is before
