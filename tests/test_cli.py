"""``python -m mixers list`` prints mixers, backends, availability, and the plugin each came from."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mixers import __main__ as cli
from mixers import registry as registry_module
from mixers.registry import Registry
from tests.fake_plugins import DISTRIBUTION, VERSION, forget_fake_modules, write_fake_distribution


def run_cli(*args: str, pythonpath: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEQMIXERS_")}
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, env.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, "-m", "mixers", *args], capture_output=True, text=True, env=env, timeout=120, check=False
    )


def line_with(output: str, *fragments: str) -> str:
    """The one line of ``output`` that contains all ``fragments``."""
    lines = [line for line in output.splitlines() if all(f in line for f in fragments)]
    assert len(lines) == 1, f"expected one line with {fragments}, found {lines} in:\n{output}"
    return lines[0]


def test_list_shows_broken_plugins_and_still_lists_the_good_ones(tmp_path):
    write_fake_distribution(tmp_path)
    result = run_cli("list", pythonpath=str(tmp_path))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.index("Mixers:") < out.index("Backends:") < out.index("Plugins:")
    # Mixers with the plugin they came from.
    assert line_with(out, "ops: retention", "plugin: mixers.retention").split()[0] == "retention"
    assert line_with(out, "ops: retention", "plugin: fake_good").split()[0] == "fake_retention"
    # ... and the distribution each came from: seqmixers itself for the built-ins.
    assert f"plugin: fake_good [{DISTRIBUTION} {VERSION}]" in line_with(out, "fake_retention ")
    assert "plugin: mixers.retention [seqmixers " in line_with(out, "ops: retention", "plugin: mixers.retention")
    assert f"plugin: fake_fast [{DISTRIBUTION} {VERSION}]" in line_with(out, "retention/fast ")
    # Backends with availability and plugin.
    assert "available" in line_with(out, "retention/torch ", "plugin: mixers.backends.torch_backend")
    assert "available" in line_with(out, "retention/fast ", "priority  50", "plugin: fake_fast")
    assert "unavailable (needs the FakeAccel driver" in line_with(out, "retention/accel ", "plugin: fake_unavailable")
    assert "probe crashed" in line_with(out, "retention/flaky ")
    # Plugins: built-ins, the distribution and version of third-party ones, broken ones with their error.
    assert line_with(out, "mixers.backends.torch_backend ", "built-in").rstrip().endswith("ok")
    assert line_with(out, "fake_good ", f"distribution {DISTRIBUTION} {VERSION}").rstrip().endswith("ok")
    assert line_with(out, "fake_broken ", f"distribution {DISTRIBUTION} {VERSION}").rstrip().endswith("BROKEN")
    broken_block = out[out.index("fake_broken ") :]
    assert "error: failed to import" in broken_block and "nonexistent_library_for_seqmixers_tests" in broken_block
    assert "fake hook exploded" in out[out.index("fake_raising ") :]


def test_list_without_plugins_lists_the_builtins():
    result = run_cli("list")
    assert result.returncode == 0, result.stderr
    assert "retention/torch" in result.stdout and "BROKEN" not in result.stdout


def test_listing_in_process(tmp_path, monkeypatch, capsys):
    write_fake_distribution(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("SEQMIXERS_PLUGINS", raising=False)
    monkeypatch.delenv("SEQMIXERS_STRICT_PLUGINS", raising=False)
    try:
        monkeypatch.setattr(registry_module, "_REGISTRY", Registry().load())
        assert cli.main(["list"]) == 0
    finally:
        forget_fake_modules()
    out = capsys.readouterr().out
    assert "BROKEN" in line_with(out, "fake_duplicate ", "distribution")
    assert "already registered by plugin 'mixers.backends.torch_backend'" in out


@pytest.mark.parametrize("argv", [[], ["frobnicate"]])
def test_bad_command_is_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert "list" in capsys.readouterr().err


def test_version_and_plain_text_help(capsys):
    import mixers

    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out == f"python -m mixers {mixers.__version__}\n"
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0 and "``" not in out and "python -m mixers list" in out
