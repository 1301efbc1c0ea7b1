"""``python -m mixers ARGS`` is ``seqmixers ARGS``; ``list`` prints mixers, backends, availability, and the plugin each
came from; ``mixers-demo`` and ``demo``."""

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
    assert "available" in line_with(out, "retention/torch ", "plugin: mixers.backends.torch_retention")
    assert "available" in line_with(out, "retention/fast ", "priority  50", "plugin: fake_fast")
    assert "unavailable (needs the FakeAccel driver" in line_with(out, "retention/accel ", "plugin: fake_unavailable")
    assert "probe crashed" in line_with(out, "retention/flaky ")
    # Plugins: built-ins, the distribution and version of third-party ones, broken ones with their error.
    assert line_with(out, "mixers.backends.torch_retention ", "built-in").rstrip().endswith("ok")
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
    assert "already registered by plugin 'mixers.backends.torch_retention'" in out


@pytest.mark.parametrize("argv", [[], ["frobnicate"]])
def test_bad_command_is_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert "list" in capsys.readouterr().err


def test_version_and_plain_text_help(capsys):
    """``python -m mixers`` is ``seqmixers``: the same version line and the same plain-text help."""
    import mixers

    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out == f"seqmixers {mixers.__version__}\n"
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0 and "``" not in out and "python -m mixers ... is this command" in " ".join(out.split())
    for command in ("train", "generate", "list", "demo", "mixers-demo"):
        assert f"\n    {command} " in out, f"{command} missing from the help:\n{out}"


@pytest.mark.parametrize(
    "argv",
    [["--version"], ["--help"], ["frobnicate"], ["train", "--config", "no-such-preset"], ["generate", "--help"]],
)
def test_python_dash_m_mixers_is_seqmixers(argv):
    """``python -m mixers ARGS`` and ``python -m models ARGS`` (the console script's module): same output, same
    exit code."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEQMIXERS_")}
    env["SEQMIXERS_PLUGINS"] = ""  # the installed plugins' commands are another test's business; keep it fast
    results = [
        subprocess.run(
            [sys.executable, "-m", package, *argv], capture_output=True, text=True, env=env, timeout=120, check=False
        )
        for package in ("mixers", "models")
    ]
    (ours, theirs) = [(r.returncode, r.stdout, r.stderr) for r in results]
    assert ours == theirs
    assert ours[0] == (2 if argv[0] in ("frobnicate", "train") else 0), ours


def test_mixers_demo_is_a_subcommand_and_demo_is_the_model_demo(monkeypatch, capsys):
    """The two demos of the two former CLIs, both under ``seqmixers``: ``mixers-demo`` (the op-level check, run
    here small) and ``demo`` (the model comparison)."""
    from mixers import demo as mixers_demo
    from models import demo as models_demo

    run = mixers_demo.run
    monkeypatch.setattr(mixers_demo, "run", lambda: run(T=48, d_model=16))
    assert cli.main(["mixers-demo"]) == 0
    out = capsys.readouterr().out
    assert "== the retention op" in out and "recurrent" in out and "retention/torch" in out
    section = out.split("== every registered mixer", 1)[1].split("== installed", 1)[0]
    for name in registry_module.get_registry().mixers:  # plugins' too, with or without heads (short_conv)
        assert f"\n  {name} " in section and "prefill + 8 recurrent steps" in section, (name, out)
    calls = []
    monkeypatch.setattr(models_demo, "run", lambda out, **kwargs: calls.append((out, kwargs)))
    assert cli.main(["demo", "--quick", "--out", "somewhere"]) == 0
    assert calls and calls[0][0] == "somewhere" and calls[0][1]["steps"] == 20


def test_mixers_never_imports_models_and_has_no_cycle_through_main():
    """The layering rule, statically: no module of ``mixers/`` imports ``models`` (``python -m mixers`` reaches
    it through importlib at call time) or ``mixers.__main__`` (the old ``demo`` <-> ``__main__`` cycle)."""
    import ast
    from pathlib import Path

    root = Path(cli.__file__).resolve().parent
    offenders = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                if name == "models" or name.startswith("models.") or name == "mixers.__main__":
                    offenders.append(f"{path.relative_to(root.parent)}:{node.lineno} imports {name}")
    assert not offenders, offenders
