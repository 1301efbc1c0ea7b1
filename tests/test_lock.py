"""The test environment's lock file (scripts/constraints.txt, scripts/lock.py): see docs/testing.md."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "scripts" / "constraints.txt"


def _lock_module():
    spec = importlib.util.spec_from_file_location("seqmixers_lock", ROOT / "scripts" / "lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_lock_pins_the_test_dependencies_exactly_and_never_torch():
    pins = _lock_module().read(LOCK)
    for name in ("hypothesis", "pytest", "pluggy", "safetensors", "pyyaml", "matplotlib", "einops", "torchscale"):
        assert name in pins, f"{name} is not pinned in {LOCK}"
    assert "torch" not in pins, "torch is the user's (a CUDA build is kept): the lock must not pin it"


def test_written_lock_matches_the_environment_it_was_written_from(tmp_path):
    lock = _lock_module()
    path = tmp_path / "constraints.txt"
    lock.write(path)
    pins = lock.read(path)
    assert pins == lock.closure() and "torch" not in pins
    assert lock.main(["check", str(path)]) == 0
    path.write_text(path.read_text().replace(f"hypothesis=={pins['hypothesis']}", "hypothesis==0.0.1"))
    assert lock.main(["check", str(path)]) == 1


def test_a_malformed_lock_line_is_named(tmp_path):
    lock = _lock_module()
    with pytest.raises(SystemExit, match=r"constraints.txt:2: expected NAME==VERSION, got 'hypothesis>=6'"):
        path = tmp_path / "constraints.txt"
        path.write_text("# c\nhypothesis>=6\n")
        lock.read(path)


@pytest.mark.skipif(
    os.environ.get("SEQMIXERS_CONSTRAINTS") != "scripts/constraints.txt",
    reason="runs only under scripts/test.sh with the project's lock (SEQMIXERS_CONSTRAINTS=scripts/constraints.txt)",
)
def test_the_locked_run_tests_exactly_the_locked_versions():
    """What CI runs: scripts/test.sh installed every pinned version, so the run tests what the lock says."""
    assert _lock_module().main(["check", str(LOCK)]) == 0  # it prints the differences otherwise
