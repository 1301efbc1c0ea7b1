"""The pluggy registry, tested with real plugin discovery: a fake distribution on ``sys.path``.

Built-ins register through the same hooks as third-party plugins; ``"auto"`` picks the best available
backend for the inputs (plugin backends only when allowed); broken plugins, ``sys.exit`` at import included,
are reported by name while the others load; environment variables filter plugins and make loading strict.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch

import mixers
from mixers import functional, hookspecs
from mixers import registry as registry_module
from mixers.catalogue import RUNTIME_PLUGIN, RegistrationError
from mixers.plugins import PluginLoadError
from mixers.registry import Registry
from tests.fake_plugins import (
    BROKEN,
    BROKEN_TWIN,
    BROKEN_TWIN_VERSION,
    DISTRIBUTION,
    GOOD,
    HEALTHY_TWIN,
    HEALTHY_TWIN_VERSION,
    TWIN_NAME,
    VERSION,
    forget_fake_modules,
    forget_other_fake_modules,
    write_fake_distribution,
    write_interrupt_distribution,
    write_twin_distribution,
)

TORCH_PLUGIN = "mixers.backends.torch_retention"


@pytest.fixture
def fake_dist(tmp_path, monkeypatch):
    """The fake distribution on ``sys.path``, with the plugin environment variables unset."""
    write_fake_distribution(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("SEQMIXERS_PLUGINS", raising=False)
    monkeypatch.delenv("SEQMIXERS_STRICT_PLUGINS", raising=False)
    monkeypatch.delenv("SEQMIXERS_AUTO_PLUGINS", raising=False)
    yield tmp_path
    forget_fake_modules()


@pytest.fixture
def reg(fake_dist) -> Registry:
    return Registry().load()


def errors(reg: Registry, plugin: str) -> str:
    return "\n".join(reg.plugins[plugin].errors)


def test_good_plugins_load_with_their_distribution(reg):
    for name in GOOD:
        info = reg.plugins[name]
        assert info.ok, info.errors
        assert (info.distribution, info.version, info.builtin) == (DISTRIBUTION, VERSION, False)
    backends = reg.backends["retention"]
    assert {"torch", "good", "fast", "accel", "flaky", "dup_ok"} <= set(backends)
    assert backends["good"].plugin == "fake_good" and backends["fast"].plugin == "fake_fast"
    assert reg.mixers["fake_retention"].plugin == "fake_good"
    assert reg.build("fake_retention", 8, num_heads=2, backend="good").d_model == 8


def test_builtins_register_through_the_same_hook(reg):
    impls = {impl.plugin_name for impl in reg.pm.hook.register_backends.get_hookimpls()}
    assert {TORCH_PLUGIN, "fake_good", "fake_fast"} <= impls
    assert reg.backends["retention"]["torch"].plugin == TORCH_PLUGIN
    assert reg.mixers["retention"].plugin == "mixers.retention"
    assert reg.plugins[TORCH_PLUGIN].builtin and reg.plugins[TORCH_PLUGIN].ok
    # Nothing is hard-coded: without plugins there is no backend, and a third-party module loaded as a
    # built-in registers exactly as it does through its entry point.
    assert Registry().load(builtins=(), entry_points=False).backends == {}
    alone = Registry().load(builtins=("fakeplug_good",), entry_points=False)
    assert set(alone.backends["retention"]) == {"good"} and set(alone.mixers) == {"fake_retention"}


@pytest.mark.parametrize(
    ("plugin", "fragments"),
    [
        ("fake_broken", ["failed to import", "fakeplug_broken", "No module named", "nonexistent_library_for"]),
        ("fake_exit", ["failed to import", "fakeplug_exit", "SystemExit", "sys.exit(3)"]),
        ("fake_malformed", ["register_backends raised RegistrationError", "other than 'auto'", "'auto'"]),
        ("fake_not_a_backend", ["expected a mixers.Backend", "got dict"]),
        ("fake_bad_mixer", ["register_mixers raised", "'fake_bad_mixer'", "factory must be callable", "42"]),
        ("fake_bad_hook", ["not a valid plugin", "registrar"]),
        ("fake_raising", ["register_backends raised RuntimeError", "fake hook exploded"]),
        (
            "fake_duplicate",
            [
                "backend 'torch'",
                f"already registered by plugin '{TORCH_PLUGIN}'",
                "mixer 'retention'",
                "already registered by plugin 'mixers.retention'",
            ],
        ),
    ],
)
def test_broken_plugin_is_reported_by_name(reg, plugin, fragments):
    info = reg.plugins[plugin]
    assert not info.ok and info.distribution == DISTRIBUTION
    message = errors(reg, plugin)
    missing = [f for f in fragments if f not in message]
    assert not missing, f"{plugin} errors {message!r} lack {missing}"


def test_broken_plugins_register_nothing_and_others_still_load(reg):
    assert set(BROKEN) <= set(reg.plugins)
    backends = reg.backends["retention"]
    # A registration is all-or-nothing per plugin: the entries staged before the failure are dropped.
    assert not {"staged", "auto", "dict", "partial"} & set(backends)
    assert "fake_bad_mixer" not in reg.mixers
    assert reg.pm.get_plugin("fake_raising") is None
    # A duplicate is ignored, the built-in stays, and the plugin's other entries load.
    assert backends["torch"].plugin == TORCH_PLUGIN and backends["torch"].priority == 0
    assert reg.mixers["retention"].plugin == "mixers.retention"
    assert backends["dup_ok"].plugin == "fake_duplicate"
    assert all(reg.plugins[name].ok for name in GOOD)


def test_unavailable_backends_say_why(reg):
    backends = reg.backends["retention"]
    assert reg.unavailable_reason(backends["accel"]) == "needs the FakeAccel driver, which is not installed"
    assert "RuntimeError: probe crashed" in reg.unavailable_reason(backends["flaky"])
    assert reg.unavailable_reason(backends["torch"]) is None
    assert reg.available()["retention"] == ["fast", "torch", "good", "dup_ok"]  # by priority, available only


@pytest.mark.parametrize(
    ("device", "dtype", "mode", "expected"),
    [
        ("cpu", torch.float32, "parallel", "fast"),
        ("cpu", torch.float32, "chunkwise", "fast"),
        ("cpu", torch.float32, "recurrent", "torch"),  # fast computes no recurrent mode
        ("cpu", torch.float64, "parallel", "torch"),  # nor float64
        ("cpu", torch.bfloat16, "chunkwise", "torch"),
        ("meta", torch.float32, "parallel", "torch"),  # nor other devices
    ],
)
def test_auto_picks_the_best_available_supporting_backend(reg, device, dtype, mode, expected):
    def auto():
        return reg.resolve_backend("retention", "auto", device=torch.device(device), dtype=dtype, mode=mode).name

    assert auto() == "torch"  # by default "auto" picks no plugin's backend for an op with a built-in one
    reg.allow_plugin_backends()
    assert auto() == expected
    reg.allow_plugin_backends(False)
    assert auto() == "torch"


def test_public_op_dispatches_through_auto(reg, monkeypatch):
    monkeypatch.setattr(registry_module, "_REGISTRY", reg)
    mixers.allow_plugin_backends(["fake_fast", "fake_good"])  # the process registry's setting
    fast, good = sys.modules["fakeplug_fast"], sys.modules["fakeplug_good"]
    q = torch.randn(1, 6, 2, 4)
    expected, _ = functional.retention(q, q, q, 0.9, mode="parallel", backend="torch")
    out, _ = functional.retention(q, q, q, 0.9, mode="parallel")
    assert fast.CALLS == ["parallel"]
    torch.testing.assert_close(out, expected)
    functional.retention(q, q, q, 0.9, mode="recurrent")  # falls back to torch
    functional.retention(q, q, q, 0.9, mode="recurrent", backend="good")
    assert fast.CALLS == ["parallel"] and good.CALLS == ["recurrent"]
    assert mixers.available()["fake_retention"][0] == "fast"


def test_unknown_backend_lists_installed_and_why_unavailable(reg):
    with pytest.raises(ValueError) as info:
        reg.resolve_backend("retention", "nope", device=torch.device("cpu"), dtype=torch.float32, mode="parallel")
    message = str(info.value)
    for fragment in [
        "'nope'",
        "'auto'",
        "'torch'",
        "'fast'",
        "'good'",
        "'accel'",
        "FakeAccel driver",
        "'flaky'",
        "probe crashed",
        "plugin 'fake_unavailable'",
    ]:
        assert fragment in message, fragment


def test_unavailable_backend_by_name_says_why(reg):
    with pytest.raises(ValueError, match="'accel'.*unavailable: needs the FakeAccel driver"):
        reg.resolve_backend("retention", "accel", device=torch.device("cpu"), dtype=torch.float32, mode="parallel")


def test_named_backend_that_cannot_take_the_inputs(reg):
    with pytest.raises(ValueError, match=r"'fast'.*cannot take these inputs.*torch\.float64"):
        reg.resolve_backend("retention", "fast", device=torch.device("cpu"), dtype=torch.float64, mode="parallel")
    with pytest.raises(ValueError, match=r"'fast'.*recurrent"):
        reg.resolve_backend("retention", "fast", device=torch.device("cpu"), dtype=torch.float32, mode="recurrent")


def test_auto_without_any_suitable_backend(fake_dist):
    only_fast = Registry().load(builtins=("fakeplug_fast",), entry_points=False)
    with pytest.raises(ValueError) as info:
        only_fast.resolve_backend("retention", "auto", device=torch.device("cpu"), dtype=torch.float64, mode="parallel")
    assert "torch.float64" in str(info.value) and "'fast'" in str(info.value)
    with pytest.raises(ValueError, match="no backend is registered for op 'softmax'.*'retention'"):
        only_fast.resolve_backend("softmax", "auto", device=torch.device("cpu"), dtype=torch.float32, mode="parallel")


def test_broken_builtin_is_reported_and_the_rest_load():
    reg = Registry().load(builtins=(TORCH_PLUGIN, "no_such_builtin_plugin", "mixers.retention"), entry_points=False)
    assert reg.plugins["no_such_builtin_plugin"].builtin
    assert "failed to import" in errors(reg, "no_such_builtin_plugin")
    assert "No module named 'no_such_builtin_plugin'" in errors(reg, "no_such_builtin_plugin")
    assert "torch" in reg.backends["retention"] and "retention" in reg.mixers


@pytest.mark.parametrize(
    ("selection", "loaded"),
    [("fake_good", {"fake_good"}), ("fake_good, fake_fast ,", {"fake_good", "fake_fast"}), ("", set())],
)
def test_plugin_selection_by_environment(fake_dist, monkeypatch, selection, loaded):
    monkeypatch.setenv("SEQMIXERS_PLUGINS", selection)
    reg = Registry().load()
    third_party = {name for name, info in reg.plugins.items() if not info.builtin}
    assert third_party == loaded
    assert "torch" in reg.backends["retention"]  # built-ins always load
    assert ("fast" in reg.backends["retention"]) == ("fake_fast" in loaded)


def test_strict_mode_raises_naming_the_plugin(fake_dist, monkeypatch):
    monkeypatch.setenv("SEQMIXERS_STRICT_PLUGINS", "1")
    with pytest.raises(PluginLoadError, match=rf"plugin '(?:{'|'.join(BROKEN)})' \(distribution {DISTRIBUTION}\)"):
        Registry().load()
    monkeypatch.setenv("SEQMIXERS_PLUGINS", "fake_raising")
    with pytest.raises(PluginLoadError, match="'fake_raising'.*fake hook exploded"):
        Registry().load()
    monkeypatch.setenv("SEQMIXERS_PLUGINS", ",".join(GOOD))
    assert Registry().load().plugins["fake_good"].ok  # strict mode passes when nothing is broken
    monkeypatch.setenv("SEQMIXERS_STRICT_PLUGINS", "0")
    monkeypatch.delenv("SEQMIXERS_PLUGINS")
    assert not Registry().load().plugins["fake_broken"].ok  # "0" means not strict


def test_duplicate_plugin_name_from_another_distribution_is_reported(tmp_path, monkeypatch):
    write_fake_distribution(tmp_path, second=True)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("SEQMIXERS_PLUGINS", "fake_good")
    monkeypatch.delenv("SEQMIXERS_STRICT_PLUGINS", raising=False)
    try:
        reg = Registry().load()
    finally:
        forget_fake_modules()
    named = [info for info in reg.plugins.values() if info.name == "fake_good"]
    assert len(named) == 2, [(i.name, i.distribution, i.errors) for i in reg.plugins.values()]
    ok, dup = sorted(named, key=lambda info: not info.ok)
    assert ok.ok and not dup.ok and dup.distribution != ok.distribution
    assert "already loaded" in "\n".join(dup.errors) and ok.distribution in "\n".join(dup.errors)


def test_process_registry_is_loaded_once_and_can_be_reset(monkeypatch):
    monkeypatch.setattr(registry_module, "_REGISTRY", None)
    first = mixers.get_registry()
    assert mixers.get_registry() is first
    registry_module.reset_registry()
    assert mixers.get_registry() is not first


def test_available_lists_the_available_backends_of_each_mixer():
    reg = mixers.get_registry()
    available = mixers.available()
    assert set(available) == set(reg.mixers)
    assert "torch" in available["retention"]
    for name, backends in available.items():
        for backend in backends:
            op_backends = [reg.backends[op][backend] for op in reg.mixers[name].ops if backend in reg.backends[op]]
            assert op_backends and all(reg.unavailable_reason(b) is None for b in op_backends), (name, backend)


def test_every_hook_is_documented_and_called_with_a_registrar():
    """Each hookspec has a docstring and a single ``register`` argument (the registry hands it over)."""
    specs = [f for _, f in inspect.getmembers(hookspecs, inspect.isfunction) if hasattr(f, "seqmixers_spec")]
    assert {f.__name__ for f in specs} >= {"register_backends", "register_mixers"}
    for spec in specs:
        assert (spec.__doc__ or "").strip(), spec.__name__
        assert list(inspect.signature(spec).parameters) == ["register"], spec.__name__
    assert mixers.hookimpl is hookspecs.hookimpl
    assert importlib.import_module(TORCH_PLUGIN).register_backends.seqmixers_impl is not None


# -- broken plugins must not end the process; a broken plugin does not block a healthy one of the same name --


def test_a_plugin_calling_sys_exit_at_import_is_broken_not_fatal(reg):
    info = reg.plugins["fake_exit"]
    assert not info.ok and info.distribution == DISTRIBUTION
    assert "SystemExit (the plugin called sys.exit(3))" in errors(reg, "fake_exit")
    assert "torch" in reg.backends["retention"] and all(reg.plugins[name].ok for name in GOOD)


def test_seqmixers_list_survives_a_plugin_calling_sys_exit(fake_dist):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEQMIXERS_")}
    env["SEQMIXERS_PLUGINS"] = "fake_exit,fake_good"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(fake_dist), env.get("PYTHONPATH")) if p)
    command = [sys.executable, "-m", "mixers", "list"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    assert "retention/good" in result.stdout and "sys.exit(3)" in result.stdout, result.stdout


def test_a_plugins_own_keyboard_interrupt_is_a_broken_plugin(tmp_path, monkeypatch):
    """Raised by the plugin, not by a SIGINT: recorded like any failure (a real Ctrl-C still stops the load:
    tests/test_trust_generate.py)."""
    write_interrupt_distribution(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("SEQMIXERS_PLUGINS", "fake_interrupt")
    try:
        reg = Registry().load()
    finally:
        forget_other_fake_modules()
    info = reg.plugins["fake_interrupt"]
    assert not info.ok and "KeyboardInterrupt (raised by the plugin itself, not a Ctrl-C)" in " ".join(info.errors)
    assert "retention" in reg.mixers, "the others still load"


@pytest.mark.parametrize("broken_first", [True, False], ids=["broken-first", "healthy-first"])
@pytest.mark.parametrize("kind", ["exit", "bad_hook"])
def test_a_broken_plugin_does_not_block_a_healthy_one_of_the_same_name(tmp_path, monkeypatch, kind, broken_first):
    """Two distributions declare entry point ``fake_twin``: whichever comes first, the healthy one loads, and the
    broken one's record names both distributions, without pluggy's table of registered plugins."""
    broken_dir, healthy_dir = tmp_path / "broken", tmp_path / "healthy"
    broken_dir.mkdir(), healthy_dir.mkdir()
    write_twin_distribution(broken_dir, kind)
    write_twin_distribution(healthy_dir, "healthy")
    for path in (healthy_dir, broken_dir) if broken_first else (broken_dir, healthy_dir):
        monkeypatch.syspath_prepend(str(path))  # the last prepended is found first
    monkeypatch.setenv("SEQMIXERS_PLUGINS", TWIN_NAME)
    monkeypatch.delenv("SEQMIXERS_STRICT_PLUGINS", raising=False)
    try:
        reg = Registry().load()
    finally:
        forget_other_fake_modules()
    healthy = reg.plugins[TWIN_NAME]
    assert healthy.ok and (healthy.distribution, healthy.version) == (HEALTHY_TWIN, HEALTHY_TWIN_VERSION)
    assert reg.backends["retention"]["twin"].plugin == TWIN_NAME
    assert "twin_partial" not in reg.backends["retention"]  # nothing of the rejected twin is kept
    (broken,) = [info for info in reg.plugins.values() if info.name == TWIN_NAME and not info.ok]
    assert broken.distribution == BROKEN_TWIN
    message = "\n".join(broken.errors)
    for fragment in (
        f"distribution {BROKEN_TWIN} {BROKEN_TWIN_VERSION}",
        f"distribution {HEALTHY_TWIN} {HEALTHY_TWIN_VERSION}",
    ):
        assert fragment in message, (fragment, message)
    assert "<module" not in message and "_name2plugin" not in message, message  # no dump of pluggy's table


# -- hooks run through pluggy, one plugin at a time --------------------------------------------------------


def _module_plugin(monkeypatch, name: str, source: str) -> str:
    """A plugin module ``name`` made from ``source`` and importable (for ``Registry.load(builtins=...)``)."""
    module = types.ModuleType(name)
    exec(compile(textwrap.dedent(source), f"<{name}>", "exec"), module.__dict__)
    monkeypatch.setitem(sys.modules, name, module)
    return name


WRAPPED_PLUGIN = """
    import mixers
    from mixers.catalogue import Backend

    SEEN = []
    FAIL_AFTER = False

    @mixers.hookimpl(wrapper=True, specname="register_backends")
    def watch_backends(register):
        SEEN.append("before")
        result = yield
        SEEN.append("after")
        if FAIL_AFTER:
            raise RuntimeError("the wrapper refused")
        return result

    @mixers.hookimpl
    def register_backends(register):
        SEEN.append("impl")
        register(Backend(op="retention", name="wrapped", fn=lambda *a, **k: None))
"""


def test_a_plugins_hook_wrapper_runs_around_its_own_hook(monkeypatch):
    """Pluggy's machinery runs (it did not when the registry called each implementation itself)."""
    name = _module_plugin(monkeypatch, "seqmixers_test_wrapped", WRAPPED_PLUGIN)
    reg = Registry().load(builtins=(TORCH_PLUGIN, name), entry_points=False)
    assert reg.plugins[name].ok, reg.plugins[name].errors
    assert sys.modules[name].SEEN == ["before", "impl", "after"]
    assert reg.backends["retention"]["wrapped"].plugin == name


def test_a_failing_wrapper_breaks_only_its_plugin_and_drops_what_it_staged(monkeypatch):
    name = _module_plugin(
        monkeypatch, "seqmixers_test_wrapped_failing", textwrap.dedent(WRAPPED_PLUGIN) + "FAIL_AFTER = True\n"
    )
    reg = Registry().load(builtins=(TORCH_PLUGIN, name), entry_points=False)
    assert "register_backends raised RuntimeError: the wrapper refused" in errors(reg, name)
    assert "wrapped" not in reg.backends["retention"] and reg.plugins[TORCH_PLUGIN].ok


def test_hook_calls_are_monitored_and_made_per_plugin(fake_dist):
    """``pm.add_hookcall_monitoring`` sees every hook call, and each call holds one plugin's implementations."""
    reg = Registry()
    calls: list[tuple[str, set[str]]] = []
    reg.pm.add_hookcall_monitoring(
        lambda hook, impls, kwargs: calls.append((hook, {impl.plugin_name for impl in impls})), lambda *a: None
    )
    reg.load()
    assert calls and all(len(plugins) == 1 for _, plugins in calls), calls
    backend_calls = [plugins.pop() for hook, plugins in calls if hook == "register_backends"]
    assert backend_calls.index(TORCH_PLUGIN) < backend_calls.index("fake_good")  # built-ins first, in load order
    assert {TORCH_PLUGIN, "fake_good", "fake_fast", "fake_raising"} <= set(backend_calls)


# -- the public API to add, replace and remove backends --------------------------------------------------------


def _fresh_registry(monkeypatch) -> Registry:
    monkeypatch.delenv("SEQMIXERS_AUTO_PLUGINS", raising=False)
    return Registry().load(entry_points=False)


def _resolve(reg: Registry, backend: str = "auto") -> str:
    return reg.resolve_backend(
        "retention", backend, device=torch.device("cpu"), dtype=torch.float32, mode="parallel"
    ).name


def test_register_backend_adds_one_that_resolves_and_unregister_removes_it(monkeypatch):
    reg = _fresh_registry(monkeypatch)
    torch_fn = reg.backends["retention"]["torch"].fn
    assert _resolve(reg) == "torch"  # cached from here on
    assert reg.register_backend("retention", "mine", torch_fn, priority=100, plugin=TORCH_PLUGIN) is None
    added = reg.backends["retention"]["mine"]
    assert (added.priority, added.plugin, added.fn) == (100, TORCH_PLUGIN, torch_fn)
    assert _resolve(reg) == "mine" and _resolve(reg, "mine") == "mine"  # the cached choice was dropped
    assert reg.unregister_backend("retention", "mine") is added
    assert _resolve(reg) == "torch" and "mine" not in reg.backends["retention"]
    with pytest.raises(ValueError, match="unknown backend 'mine'"):
        _resolve(reg, "mine")
    with pytest.raises(KeyError, match="no backend 'mine' is registered for op 'retention'"):
        reg.unregister_backend("retention", "mine")


def test_a_backend_added_without_a_plugin_is_not_picked_by_auto_for_a_builtin_op(monkeypatch):
    reg = _fresh_registry(monkeypatch)
    reg.register_backend(
        mixers.Backend(op="retention", name="mine", fn=reg.backends["retention"]["torch"].fn, priority=9)
    )
    assert reg.backends["retention"]["mine"].plugin == RUNTIME_PLUGIN
    assert _resolve(reg) == "torch" and _resolve(reg, "mine") == "mine"


def test_register_backend_refuses_to_replace_unless_told(monkeypatch):
    reg = _fresh_registry(monkeypatch)
    original = reg.backends["retention"]["torch"]
    with pytest.raises(RegistrationError) as info:
        reg.register_backend("retention", "torch", lambda *a, **k: None, plugin="my_tests")
    message = str(info.value)
    for fragment in (f"backend 'torch' of op 'retention' (plugin '{TORCH_PLUGIN}' (built-in))", "override=True"):
        assert fragment in message, message
    assert reg.backends["retention"]["torch"] is original
    for bad, match in [
        (mixers.Backend(op="retention", name="auto", fn=original.fn), "other than 'auto'"),
        (mixers.Backend(op="retention", name="x", fn=original.fn, priority=1.5), "priority must be an int"),
    ]:
        with pytest.raises(RegistrationError, match=match):
            reg.register_backend(bad)
    with pytest.raises(TypeError, match="unexpected keyword argument 'colour'"):
        reg.register_backend("retention", "x", original.fn, colour="red")


def test_override_and_temporary_backend_put_the_original_back_and_drop_cached_availability(monkeypatch):
    reg = _fresh_registry(monkeypatch)
    original = reg.backends["retention"]["torch"]
    assert reg.unavailable_reason(original) is None  # cached
    missing = dataclasses.replace(original, check_available=lambda: "pretend the driver is missing")
    with reg.temporary_backend(missing, override=True) as added:
        assert reg.backends["retention"]["torch"] is added and added.plugin == TORCH_PLUGIN
        assert reg.unavailable_reason(added) == "pretend the driver is missing"
        with pytest.raises(ValueError, match="pretend the driver is missing"):
            _resolve(reg, "torch")
    assert reg.backends["retention"]["torch"] is original
    assert reg.unavailable_reason(original) is None and _resolve(reg, "torch") == "torch"
    with reg.temporary_backend("retention", "extra", original.fn, plugin="my_tests") as extra:
        assert reg.backends["retention"]["extra"] is extra and extra.plugin == "my_tests"
    assert "extra" not in reg.backends["retention"]
    assert reg.register_backend(missing, override=True) is original
