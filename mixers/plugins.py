"""Plugin loading: the built-ins and the ``seqmixers`` entry points, each loaded on its own through pluggy.

Each plugin is loaded and called on its own (its hooks through pluggy, with the other plugins left out:
``PluginLoader.call_plugin_hook``), so one that fails to import, raises in a hook or registers something
malformed is recorded (``Registry.plugins[name].errors``) and the others still load; what a plugin registers is
committed to the catalogue only if all its hooks succeed.

Environment variables:
- ``SEQMIXERS_PLUGINS``: comma-separated entry-point names to load; unset loads all, ``""`` loads
  none (the built-ins always load). Rescues a user from a third-party plugin that breaks everything.
- ``SEQMIXERS_STRICT_PLUGINS=1``: raise on the first broken plugin instead of recording it.

A plugin that raises while it is imported or its hooks run, ``SystemExit`` and ``KeyboardInterrupt`` included, is
recorded as broken; the user's Ctrl-C (a SIGINT that arrives while plugins load) still gets through.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.metadata
import os
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pluggy
import torch

from mixers import hookspecs
from mixers.catalogue import Backend, Catalogue, FeatureMap, MixerSpec, PluginInfo, RegistrationError, _checked_backend

ENTRY_POINT_GROUP = "seqmixers"


DEFAULT_PLUGINS: tuple[str, ...] = (
    # ops: each folder registers its Op
    "mixers.ops.retention",
    "mixers.ops.linear_attention",
    "mixers.ops.softmax_attention",
    "mixers.ops.gated_retention",
    # backends: each file registers its own
    "mixers.backends.torch_retention",
    "mixers.backends.torch_linear_attention",
    "mixers.backends.torch_softmax_attention",
    "mixers.backends.torch_gated_retention",
    "mixers.backends.cupy",
    # mixers
    "mixers.retention",
    "mixers.linear_attention",
    "mixers.softmax_attention",
    "mixers.gated_retention",
)


class PluginLoadError(RuntimeError):
    """Raised in strict mode (``SEQMIXERS_STRICT_PLUGINS=1``) for the first broken plugin."""


# What a plugin may raise while it is imported or its hooks run and still count as merely broken: a plugin
# calling sys.exit() must not end the process that loads the registry, but Ctrl-C must still stop it. While the
# registry loads, a KeyboardInterrupt that no SIGINT caused is the plugin's own doing too (``_CtrlC``).
PLUGIN_FAILURES: tuple[type[BaseException], ...] = (Exception, SystemExit)


class _CtrlC:
    """Whether the user pressed Ctrl-C while plugins load, to tell it from a plugin's own ``raise
    KeyboardInterrupt`` (which must not end ``seqmixers list`` as if the user had stopped it)."""

    def __init__(self, known: bool = True) -> None:
        self.pressed = False
        self.known = known  # False: a SIGINT handler this process cannot watch (set outside Python)

    @property
    def failures(self) -> tuple[type[BaseException], ...]:
        """What a plugin's failure is, read when an exception is matched (after any SIGINT it raised from)."""
        return PLUGIN_FAILURES if self.pressed or not self.known else (*PLUGIN_FAILURES, KeyboardInterrupt)


@contextlib.contextmanager
def _watching_ctrl_c() -> Iterator[_CtrlC]:
    """Note each SIGINT while the block runs, then handle it as before (by wrapping the current handler)."""
    if threading.current_thread() is not threading.main_thread():
        yield _CtrlC()  # signals are handled in the main thread only: a KeyboardInterrupt here is raised by code
        return
    previous = signal.getsignal(signal.SIGINT)
    if not callable(previous):  # SIG_IGN, SIG_DFL: Ctrl-C never raises KeyboardInterrupt; None: not Python's
        yield _CtrlC(known=previous is not None)
        return
    watch = _CtrlC()

    def note(signum: int, frame: Any) -> Any:
        watch.pressed = True
        return previous(signum, frame)

    signal.signal(signal.SIGINT, note)
    try:
        yield watch
    finally:
        if signal.getsignal(signal.SIGINT) is note:  # a plugin that set its own handler keeps it
            signal.signal(signal.SIGINT, previous)


def _failure(exc: BaseException) -> str:
    if isinstance(exc, SystemExit):
        return f"SystemExit (the plugin called sys.exit({exc.code!r}))"
    if isinstance(exc, KeyboardInterrupt):
        return "KeyboardInterrupt (raised by the plugin itself, not a Ctrl-C)"
    return f"{type(exc).__name__}: {exc}"


def _pluggy_message(exc: BaseException) -> str:
    """pluggy's message without the dump of its internal name-to-plugin table that some of them end with."""
    return _failure(exc).split("\n{", 1)[0]


class _Staging:
    """Collects one plugin's registrations; they are committed only if the whole hook succeeds."""

    def __init__(self, plugin: str) -> None:
        self.plugin = plugin
        self.ops: list[Any] = []
        self.backends: list[Backend] = []
        self.mixers: list[MixerSpec] = []
        self.feature_maps: list[FeatureMap] = []

    def backend(self, backend: Backend) -> None:
        self.backends.append(_checked_backend(backend, self.plugin))

    def op(self, op: Any) -> None:
        # Checked by what it has, not its class: the registry holds ops, it does not import them.
        if not all(hasattr(op, a) for a in ("name", "prepare", "backend_signature", "plugin")):
            raise RegistrationError(f"register() expected a mixers.ops.Op, got {type(op).__name__}")
        if not isinstance(op.name, str) or not op.name or op.name == "auto":
            raise RegistrationError(f"Op.name must be a non-empty name other than 'auto', got {op.name!r}")
        if not callable(op.prepare):
            raise RegistrationError(f"Op {op.name!r}: prepare must be callable, got {op.prepare!r}")
        self.ops.append(dataclasses.replace(op, plugin=self.plugin))

    def mixer(self, name: str, factory: Callable[..., Any], *, ops: Iterable[str] = (), description: str = "") -> None:
        if not isinstance(name, str) or not name:
            raise RegistrationError(f"mixer name must be a non-empty str, got {name!r}")
        if not callable(factory):
            raise RegistrationError(f"mixer {name!r}: factory must be callable, got {factory!r}")
        ops = tuple(ops)
        if not all(isinstance(op, str) for op in ops):
            raise RegistrationError(f"mixer {name!r}: ops must be op names (str), got {ops!r}")
        self.mixers.append(MixerSpec(name, factory, ops, description, self.plugin))

    def feature_map(self, name: str, fn: Callable[[torch.Tensor], torch.Tensor], *, description: str = "") -> None:
        if not isinstance(name, str) or not name:
            raise RegistrationError(f"feature map name must be a non-empty str, got {name!r}")
        if not callable(fn):
            raise RegistrationError(f"feature map {name!r}: fn must be callable, got {fn!r}")
        self.feature_maps.append(FeatureMap(name, fn, description, self.plugin))


class PluginLoader(Catalogue):
    """Fills the catalogue from the plugins, isolating each one."""

    def __init__(self) -> None:
        super().__init__()
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.strict = os.environ.get("SEQMIXERS_STRICT_PLUGINS", "") not in ("", "0")

    # -- loading -----------------------------------------------------------------------------
    def load(self, builtins: Iterable[str] = DEFAULT_PLUGINS, entry_points: bool = True) -> PluginLoader:
        with _watching_ctrl_c() as ctrl_c:
            return self._load(builtins, entry_points, ctrl_c)

    def _load(self, builtins: Iterable[str], entry_points: bool, ctrl_c: _CtrlC) -> PluginLoader:
        for module_name in builtins:
            info = PluginInfo(module_name, builtin=True)
            try:
                module = importlib.import_module(module_name)
            except ctrl_c.failures as exc:  # a broken built-in is reported like any other plugin
                self._fail(info, f"failed to import: {_failure(exc)}")
                continue
            self._add_plugin(info, module, ctrl_c)
        if entry_points:
            wanted = os.environ.get("SEQMIXERS_PLUGINS")
            names = None if wanted is None else {n.strip() for n in wanted.split(",") if n.strip()}
            for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
                if names is not None and ep.name not in names:
                    continue
                dist = getattr(ep, "dist", None)
                info = PluginInfo(
                    ep.name,
                    distribution=dist.metadata["Name"] if dist is not None else None,
                    version=dist.version if dist is not None else None,
                )
                # The name is taken only by a plugin that loaded: a broken one of the same name (from another
                # distribution) does not block a healthy one, which then takes the name.
                if self.pm.has_plugin(ep.name):
                    holder = self.plugins[ep.name]
                    self._fail(
                        info,
                        f"a plugin named {ep.name!r} is already loaded from {self._source(holder)}; this one, from "
                        f"{self._source(info)}, is ignored (two installed distributions declare the entry point "
                        f"{ep.name!r} in group {ENTRY_POINT_GROUP!r}: uninstall one of them)",
                    )
                    continue
                try:
                    obj = ep.load()
                except ctrl_c.failures as exc:
                    self._fail(info, f"failed to import {ep.value!r}: {_failure(exc)}")
                    continue
                self._add_plugin(info, obj, ctrl_c)
        return self

    @staticmethod
    def _source(info: PluginInfo) -> str:
        if info.builtin:
            return "the built-ins"
        return f"distribution {info.distribution or 'unknown'} {info.version or ''}".rstrip()

    def _fail(self, info: PluginInfo, message: str) -> None:
        info.errors.append(message)
        key = info.name
        if self.plugins.get(key, info) is not info:  # a second plugin of that name: keep both on record
            key = f"{info.name} ({info.distribution or 'built-in'})"
        self.plugins.setdefault(key, info)
        if self.strict:
            where = f" (distribution {info.distribution})" if info.distribution else ""
            raise PluginLoadError(f"plugin {info.name!r}{where}: {message}")

    def _take_name(self, info: PluginInfo) -> None:
        """Record ``info`` under its name; a broken plugin of that name on record moves to a qualified key."""
        earlier = self.plugins.get(info.name)
        if earlier is not None and earlier is not info:
            del self.plugins[info.name]
            earlier.errors.append(
                f"another plugin named {info.name!r}, from {self._source(info)}, loaded in place of this one "
                f"(from {self._source(earlier)})"
            )
            self.plugins[f"{earlier.name} ({earlier.distribution or 'built-in'})"] = earlier
        self.plugins[info.name] = info

    def _add_plugin(self, info: PluginInfo, obj: object, ctrl_c: _CtrlC) -> None:
        if self.pm.is_registered(obj):
            other = self.pm.get_name(obj)
            self._fail(info, f"is the same object as plugin {other!r}, already loaded; this one is ignored")
            return
        try:
            self.pm.register(obj, name=info.name)
        except ctrl_c.failures as exc:  # pluggy validates hook names and signatures here
            if self.pm.get_plugin(info.name) is obj:  # pluggy keeps what it registered before the failure
                self.pm.unregister(name=info.name)
            self._fail(info, f"is not a valid plugin: {_pluggy_message(exc)}")
            return
        self._take_name(info)
        staging = _Staging(info.name)
        hooks = (
            ("register_ops", staging.op),
            ("register_backends", staging.backend),
            ("register_mixers", staging.mixer),
            ("register_feature_maps", staging.feature_map),
        )
        for hook_name, registrar in hooks:
            try:
                self.call_plugin_hook(info.name, hook_name, register=registrar)
            except ctrl_c.failures as exc:
                self.pm.unregister(name=info.name)
                self._fail(info, f"{hook_name} raised {_failure(exc)}")
                return
        self._commit(info, staging)

    def plugin_hook_caller(self, plugin: str, hook_name: str) -> pluggy.HookCaller:
        """Pluggy's caller of hook ``hook_name`` restricted to the implementations of plugin ``plugin``.

        Calling it runs pluggy's machinery (the plugin's wrappers, ``pm.trace``, ``pm.add_hookcall_monitoring``)
        for that one plugin, so that what fails is that plugin's doing alone.
        """
        target = self.pm.get_plugin(plugin)
        if target is None:
            raise ValueError(f"no plugin named {plugin!r} is registered with the plugin manager")
        others = [obj for obj in self.pm.get_plugins() if obj is not target]
        caller = self.pm.subset_hook_caller(hook_name, remove_plugins=others)
        strangers = sorted({impl.plugin_name for impl in caller.get_hookimpls()} - {plugin})
        if strangers:  # a guard: older pluggy releases keep a plugin whose hook is under another name (specname)
            raise RuntimeError(f"pluggy did not restrict hook {hook_name!r} to plugin {plugin!r}: {strangers}")
        return caller

    def call_plugin_hook(self, plugin: str, hook_name: str, **kwargs: Any) -> list[Any]:
        """Call hook ``hook_name`` of plugin ``plugin`` alone, through pluggy (see ``plugin_hook_caller``); not at
        all if the plugin does not implement it."""
        caller = self.plugin_hook_caller(plugin, hook_name)
        return caller(**kwargs) if caller.get_hookimpls() else []

    def _commit(self, info: PluginInfo, staging: _Staging) -> None:
        def duplicate(what: str, earlier: str) -> None:
            self._fail(
                info,
                f"{what} is already registered by plugin {self.describe_plugin(earlier)}; "
                f"this one (from plugin {self.describe_plugin(info.name)}) is ignored",
            )

        def commit(table: dict[str, Any], name: str, item: Any, what: str) -> None:
            earlier = table.get(name)
            if earlier is not None:
                duplicate(what, earlier.plugin)
            else:
                table[name] = item

        for op in staging.ops:
            commit(self.ops, op.name, op, f"op {op.name!r}")
        for b in staging.backends:
            commit(self.backends.setdefault(b.op, {}), b.name, b, f"backend {b.name!r} for op {b.op!r}")
        for m in staging.mixers:
            commit(self.mixers, m.name, m, f"mixer {m.name!r}")
        for fm in staging.feature_maps:
            commit(self.feature_maps, fm.name, fm, f"feature map {fm.name!r}")
