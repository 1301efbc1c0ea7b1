"""Plugins' subcommands (the ``register_commands`` hook), what start-up imports, and the pytest plugin's weight."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mixers import registry as registry_module
from mixers.plugins import ENTRY_POINT_GROUP, PluginLoadError
from mixers.registry import Registry
from models import cli

ROOT = Path(__file__).resolve().parents[1]

COMMAND_PLUGINS = {
    # Two commands: one prints its option, one exits with the code it is given.
    "fake_cmd": (
        "cmdplug_good",
        """
        import mixers

        @mixers.hookimpl
        def register_commands(register):
            hello = register("hello", lambda args: print(f"hello {args.name}"), help="a plugin's greeting")
            hello.add_argument("--name", default="world")
            register("exit-with", lambda args: args.code, help="exit with CODE").add_argument("code", type=int)
        """,
    ),
    # Adds a command, then raises: the command is taken back, the others stay.
    "fake_cmd_raising": (
        "cmdplug_raising",
        """
        import mixers

        @mixers.hookimpl
        def register_commands(register):
            register("half-added", print, help="never listed")
            raise RuntimeError("command hook exploded")
        """,
    ),
    # Takes a built-in command's name: refused.
    "fake_cmd_clash": (
        "cmdplug_clash",
        """
        import mixers

        @mixers.hookimpl
        def register_commands(register):
            register("train", print, help="a second train")
        """,
    ),
}


def write_command_distribution(root: Path) -> Path:
    for module, body in COMMAND_PLUGINS.values():
        (root / f"{module}.py").write_text(textwrap.dedent(body))
    info = root / "cmdplug-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: cmdplug\nVersion: 0.1\n")
    lines = ["[seqmixers]", *(f"{ep} = {module}" for ep, (module, _) in COMMAND_PLUGINS.items())]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def commands(tmp_path, monkeypatch):
    """The fake command plugins installed, and a registry loaded with them (and whatever else is installed)."""
    write_command_distribution(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    for var in ("SEQMIXERS_PLUGINS", "SEQMIXERS_STRICT_PLUGINS"):
        monkeypatch.delenv(var, raising=False)
    try:
        monkeypatch.setattr(registry_module, "_REGISTRY", Registry().load())
        yield tmp_path
    finally:
        for name in [m for m in sys.modules if m.startswith("cmdplug_")]:
            del sys.modules[name]


def test_a_plugins_command_runs_with_its_options_and_exit_code(commands, capsys):
    assert cli.main(["hello", "--name", "plugins"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "hello plugins\n"
    assert cli.main(["exit-with", "5"]) == 5
    with pytest.raises(SystemExit) as info:
        cli.main(["exit-with", "five"])  # the plugin's own options are parsed like the built-ins'
    assert info.value.code == 2 and "invalid int value: 'five'" in capsys.readouterr().err


def test_plugin_commands_appear_in_help_and_broken_hooks_are_reported_not_fatal(commands, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    captured = capsys.readouterr()
    assert info.value.code == 0
    assert "hello" in captured.out and "a plugin's greeting" in captured.out and "exit-with" in captured.out
    assert "half-added" not in captured.out and "a second train" not in captured.out
    assert "train a model from a config file or preset" in captured.out  # the built-in train, still there
    err = captured.err
    assert (
        "seqmixers: warning: plugin 'fake_cmd_raising' (distribution cmdplug 0.1): register_commands raised "
        "RuntimeError: command hook exploded; its commands are left out"
    ) in err
    clash = "plugin 'fake_cmd_clash' (distribution cmdplug 0.1): register_commands raised ValueError: "
    assert clash + "the command name 'train' is taken by seqmixers; its commands are left out" in err
    with pytest.raises(SystemExit) as info:
        cli.main(["half-added"])  # taken back: an unknown command
    assert info.value.code == 2 and "invalid choice: 'half-added'" in capsys.readouterr().err


def test_command_hooks_are_called_through_pluggy_one_plugin_at_a_time(commands, capsys):
    """``pm.add_hookcall_monitoring`` sees each plugin's ``register_commands`` call, holding that plugin alone."""
    calls: list[set[str]] = []
    registry_module.get_registry().pm.add_hookcall_monitoring(
        lambda hook, impls, kwargs: (
            calls.append({i.plugin_name for i in impls}) if hook == "register_commands" else None
        ),
        lambda *args: None,
    )
    assert cli.main(["hello", "--name", "pluggy"]) == 0
    assert "hello pluggy" in capsys.readouterr().out
    assert {"fake_cmd"} in calls and {"fake_cmd_raising"} in calls and all(len(c) == 1 for c in calls), calls


def test_strict_plugins_make_a_broken_command_hook_fatal(commands, monkeypatch):
    monkeypatch.setattr(registry_module.get_registry(), "strict", True)
    with pytest.raises(PluginLoadError, match="'fake_cmd_raising'.*command hook exploded"):
        cli.main(["hello"])


def test_built_in_commands_do_not_load_the_plugins(commands, monkeypatch, capsys):
    """``seqmixers train|generate|export|convert|list|demo|mixers-demo ...`` and ``--version`` never call the hook; the
    built-in commands are the parser's own, every one of them."""

    def boom(subparsers):
        raise AssertionError("plugins' commands loaded for a built-in command")

    monkeypatch.setattr(cli, "_add_plugin_commands", boom)
    assert set(cli.builtin_commands()) == {"train", "generate", "export", "convert", "list", "demo", "mixers-demo"}
    for argv in [*([command, "--help"] for command in cli.builtin_commands()), ["--version"]]:
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        assert info.value.code == 0, argv
    assert not cli._wants_plugin_commands(["list"]) and not cli._wants_plugin_commands(["demo", "--quick"])
    assert not cli._wants_plugin_commands(["export", "run", "--out", "x.safetensors"])
    assert cli._wants_plugin_commands(["--help"]) and cli._wants_plugin_commands(["hello"])
    assert cli._wants_plugin_commands([])  # the usage error lists every command
    monkeypatch.setenv("SEQMIXERS_PLUGINS", "")  # no third-party plugin: nothing to ask, nothing to import
    assert not cli._wants_plugin_commands(["--help"]) and not cli._wants_plugin_commands(["hello"])
    monkeypatch.setenv("SEQMIXERS_PLUGINS", "fake_cmd")
    assert cli._wants_plugin_commands(["hello"])


def test_python_dash_m_mixers_runs_a_plugins_command(tmp_path):
    """For real: the entry points found by importlib.metadata, ``python -m mixers`` forwarding to seqmixers."""
    write_command_distribution(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEQMIXERS_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tmp_path), env.get("PYTHONPATH")) if p)
    result = subprocess.run(
        [sys.executable, "-m", "mixers", "hello", "--name", "you"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hello you\n" and "command hook exploded" in result.stderr


def test_the_entry_point_group_is_the_registrys():
    assert cli.PLUGIN_GROUP == ENTRY_POINT_GROUP


def _imports_torch(code: str, **env: str) -> bool:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SEQMIXERS_")}
    environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), environ.get("PYTHONPATH")) if p)
    environ.update(env)
    script = f"import sys\n{textwrap.dedent(code)}\nprint('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environ, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()[-1] == "True"


def test_start_up_does_not_import_torch():
    """``seqmixers --version``, a built-in command's ``--help``, ``python -m mixers``'s module, and ``--help`` when
    no third-party plugin is installed: no torch (it takes seconds)."""
    code = """
        import contextlib, io
        import mixers.__main__
        for argv in (["--version"], ["train", "--help"], ["generate", "--help"], ["--help"]):
            with contextlib.redirect_stdout(io.StringIO()):
                try:
                    mixers.__main__.main(argv)
                except SystemExit as exc:
                    assert exc.code == 0, (argv, exc.code)
    """
    assert not _imports_torch(code, SEQMIXERS_PLUGINS="")


def test_the_pytest_plugin_imports_no_torch():
    assert not _imports_torch("import mixers.testing.pytest_plugin")
    assert not _imports_torch("import mixers, mixers.hookspecs; mixers.hookimpl")
    assert _imports_torch("import mixers; mixers.build")  # the public names still load, on first use


def test_a_pytest_run_in_an_environment_with_seqmixers_imports_no_torch(tmp_path):
    """The ``pytest11`` entry point loads the plugin into every pytest run: its options are there, torch is not."""
    assert any(ep.value == "mixers.testing.pytest_plugin" for ep in importlib.metadata.entry_points(group="pytest11"))
    (tmp_path / "conftest.py").write_text(
        "import sys\n\ndef pytest_sessionfinish(session):\n"
        "    (session.config.rootpath / 'torch.txt').write_text(str('torch' in sys.modules))\n"
    )
    (tmp_path / "test_nothing.py").write_text("def test_nothing():\n    pass\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SEQMIXERS_", "PYTEST_"))}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--seqmixers-max-examples=3"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "torch.txt").read_text() == "False"
    help_text = subprocess.run([*command, "--help"], cwd=tmp_path, env=env, capture_output=True, text=True).stdout
    assert "--seqmixers-conformance=NAME[:BACKEND]" in help_text
