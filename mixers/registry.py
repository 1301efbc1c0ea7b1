"""The registry of mixers, op backends and feature maps, filled through pluggy hooks.

Plugins are loaded lazily and once (on the first ``get_registry()``): first the built-in plugins in
``DEFAULT_PLUGINS``, then every entry point of the ``seqmixers`` group. Each plugin is loaded and
called on its own (its hooks through pluggy, with the other plugins left out: ``Registry.call_plugin_hook``),
so one that fails to import, raises in a hook or registers something malformed is recorded
(``Registry.plugins[name].error``) and the others still load. Backends are added, replaced or removed after
loading only through ``Registry.register_backend``/``unregister_backend``/``temporary_backend``.

Environment variables:
- ``SEQMIXERS_PLUGINS``: comma-separated entry-point names to load; unset loads all, ``""`` loads
  none (the built-ins always load). Rescues a user from a third-party plugin that breaks everything.
- ``SEQMIXERS_STRICT_PLUGINS=1``: raise on the first broken plugin instead of recording it.
- ``SEQMIXERS_AUTO_PLUGINS``: which third-party plugins ``backend="auto"`` may pick for an op that has a
  built-in backend. Unset, ``""`` or ``"0"``: none (a named backend always works); ``"1"``: all;
  ``"a,b"``: the plugins so named. ``allow_plugin_backends()`` sets the same from Python.

A plugin that raises while it is imported or its hooks run, ``SystemExit`` and ``KeyboardInterrupt`` included, is
recorded as broken; the user's Ctrl-C (a SIGINT that arrives while plugins load) still gets through.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import difflib
import importlib
import importlib.metadata
import inspect
import os
import signal
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pluggy
import torch

from mixers import hookspecs

ENTRY_POINT_GROUP = "seqmixers"
DEFAULT_PLUGINS: tuple[str, ...] = (
    "mixers.ops",
    "mixers.backends.torch_backend",
    "mixers.backends.cupy",
    "mixers.retention",
    "mixers.linear_attention",
    "mixers.softmax_attention",
)


class RegistrationError(ValueError):
    """A plugin registered something malformed or a duplicate."""


class PluginLoadError(RuntimeError):
    """Raised in strict mode (``SEQMIXERS_STRICT_PLUGINS=1``) for the first broken plugin."""


class BackendOutputError(RuntimeError):
    """A backend returned outputs of the wrong structure, shape, dtype or device (checked at the op boundary)."""


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


# The plugin a backend added with ``Registry.register_backend`` is recorded as, when it names none.
RUNTIME_PLUGIN = "<runtime>"

AUTO_PLUGINS_ENV = "SEQMIXERS_AUTO_PLUGINS"
_AUTO_HINT = f"plugin backends need {AUTO_PLUGINS_ENV}=1 or mixers.allow_plugin_backends()"


def _auto_plugins_from_env() -> bool | frozenset[str]:
    """``SEQMIXERS_AUTO_PLUGINS``: unset/""/"0" -> none, "1" -> all, "a,b" -> those plugin names."""
    value = os.environ.get(AUTO_PLUGINS_ENV, "").strip()
    if value in ("", "0"):
        return frozenset()
    if value == "1":
        return True
    return frozenset(n.strip() for n in value.split(",") if n.strip())


def _failure(exc: BaseException) -> str:
    if isinstance(exc, SystemExit):
        return f"SystemExit (the plugin called sys.exit({exc.code!r}))"
    if isinstance(exc, KeyboardInterrupt):
        return "KeyboardInterrupt (raised by the plugin itself, not a Ctrl-C)"
    return f"{type(exc).__name__}: {exc}"


def _pluggy_message(exc: BaseException) -> str:
    """pluggy's message without the dump of its internal name-to-plugin table that some of them end with."""
    return _failure(exc).split("\n{", 1)[0]


@dataclass(frozen=True)
class Backend:
    """One implementation of one op.

    ``fn`` receives inputs already validated by the op's public function (for ``"retention"``:
    ``fn(q, k, v, gamma, *, mode, chunk_size, initial_state) -> (o, final_state)``; for
    ``"linear_attention"``: ``fn(q, k, v, *, mode, chunk_size, initial_state, normalize, eps) -> (o, (kv, z))``;
    for ``"softmax_attention"``: ``fn(q, k, v, *, mode, chunk_size, initial_state) -> (o, (k_cache, v_cache))``).
    ``check_available()`` returns ``None`` when the backend can run here, else the reason it cannot
    (it is called once and cached). ``devices``/``dtypes``/``modes`` of ``None`` mean "any".
    ``"auto"`` picks the highest ``priority`` among available backends that support the inputs, of those
    it may pick: for an op with a built-in backend, the built-ins and the plugins allowed by
    ``allow_plugin_backends`` / ``SEQMIXERS_AUTO_PLUGINS``; for a plugin's own op, that plugin's backends.
    ``traceable=False`` says that dynamo cannot trace ``fn`` (CuPy, ctypes, numpy...): so that a model
    using it still compiles with ``fullgraph=True``, the registry replaces ``fn`` by a wrapper that calls
    it directly in eager mode and through an opaque ``torch.library`` custom op under ``torch.compile``
    (``mixers.backends.opaque``; the three built-in ops only, see docs/compile.md).
    """

    op: str
    name: str
    fn: Callable[..., Any]
    priority: int = 0
    devices: frozenset[str] | None = None
    dtypes: frozenset[torch.dtype] | None = None
    modes: frozenset[str] | None = None
    check_available: Callable[[], str | None] | None = None
    description: str = ""
    plugin: str = ""  # filled in by the registry: the plugin that registered it
    traceable: bool = True
    packs: bool = False  # fn takes cu_seqlens (a mixers.packing.Packing) and computes every packed sequence itself

    def unsupported_reason(self, device: torch.device, dtype: torch.dtype, mode: str) -> str | None:
        """Why this backend cannot take these inputs, or ``None`` if it can."""
        if self.devices is not None and device.type not in self.devices:
            return f"runs on {sorted(self.devices)} devices, not {device.type!r}"
        if self.dtypes is not None and dtype not in self.dtypes:
            return f"takes dtypes {sorted(str(d) for d in self.dtypes)}, not {dtype}"
        if self.modes is not None and mode not in self.modes:
            return f"computes modes {sorted(self.modes)}, not {mode!r}"
        return None


@dataclass(frozen=True)
class MixerSpec:
    """A registered token mixer: ``factory(d_model, **options)`` builds a ``TokenMixer``."""

    name: str
    factory: Callable[..., Any]
    ops: tuple[str, ...] = ()
    description: str = ""
    plugin: str = ""


@dataclass(frozen=True)
class FeatureMap:
    """A registered feature map for linear attention: ``fn`` maps ``[B, T, H, D]`` to ``[B, T, H, D']``."""

    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    description: str = ""
    plugin: str = ""


@dataclass
class PluginInfo:
    """What the registry knows of one plugin: where it came from and whether it loaded."""

    name: str
    distribution: str | None = None  # None for built-ins
    version: str | None = None
    builtin: bool = False
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def _checked_backend(backend: Backend, plugin: str) -> Backend:
    """``backend`` with ``plugin`` filled in, if it is well formed; else ``RegistrationError``."""
    if not isinstance(backend, Backend):
        raise RegistrationError(f"register() expected a mixers.registry.Backend, got {type(backend).__name__}")
    for attr in ("op", "name"):
        value = getattr(backend, attr)
        if not isinstance(value, str) or not value or value == "auto":
            raise RegistrationError(f"Backend.{attr} must be a non-empty name other than 'auto', got {value!r}")
    if not callable(backend.fn):
        raise RegistrationError(f"Backend {backend.op}/{backend.name}: fn must be callable, got {backend.fn!r}")
    if not isinstance(backend.priority, int) or isinstance(backend.priority, bool):
        raise RegistrationError(
            f"Backend {backend.op}/{backend.name}: priority must be an int, got {backend.priority!r}"
        )
    if backend.check_available is not None and not callable(backend.check_available):
        raise RegistrationError(f"Backend {backend.op}/{backend.name}: check_available must be callable")
    if not isinstance(backend.traceable, bool):
        raise RegistrationError(
            f"Backend {backend.op}/{backend.name}: traceable must be a bool, got {backend.traceable!r}"
        )
    changes: dict[str, Any] = {} if backend.plugin == plugin else {"plugin": plugin}
    if not backend.traceable:
        from mixers.backends import opaque  # imports mixers.functional, which imports this module

        if not opaque.is_wrapped(backend.fn):
            changes["fn"] = opaque.wrap(backend.op, backend.name, backend.fn)
    return dataclasses.replace(backend, **changes) if changes else backend


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
        from mixers.ops.base import Op  # the ops import the registry: import them on use

        if not isinstance(op, Op):
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


BackendRegistrar = Callable[[Backend], None]
OpRegistrar = Callable[[Any], None]  # register(mixers.ops.Op(...))
MixerRegistrar = Callable[..., None]
FeatureMapRegistrar = Callable[..., None]


class Registry:
    """Mixers, backends and feature maps from all plugins, with where each came from and what failed."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.ops: dict[str, Any] = {}  # name -> mixers.ops.Op
        self.backends: dict[str, dict[str, Backend]] = {}
        self.mixers: dict[str, MixerSpec] = {}
        self.feature_maps: dict[str, FeatureMap] = {}
        self.plugins: dict[str, PluginInfo] = {}
        self._availability: dict[tuple[str, str], str | None] = {}
        self._resolved: dict[tuple, Backend] = {}
        self.strict = os.environ.get("SEQMIXERS_STRICT_PLUGINS", "") not in ("", "0")
        self.auto_plugins: bool | frozenset[str] = _auto_plugins_from_env()

    # -- loading -----------------------------------------------------------------------------
    def load(self, builtins: Iterable[str] = DEFAULT_PLUGINS, entry_points: bool = True) -> Registry:
        with _watching_ctrl_c() as ctrl_c:
            return self._load(builtins, entry_points, ctrl_c)

    def _load(self, builtins: Iterable[str], entry_points: bool, ctrl_c: _CtrlC) -> Registry:
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

        for op in staging.ops:
            existing_op = self.ops.get(op.name)
            if existing_op is not None:
                duplicate(f"op {op.name!r}", existing_op.plugin)
                continue
            self.ops[op.name] = op
        for b in staging.backends:
            existing = self.backends.get(b.op, {}).get(b.name)
            if existing is not None:
                duplicate(f"backend {b.name!r} for op {b.op!r}", existing.plugin)
                continue
            self.backends.setdefault(b.op, {})[b.name] = b
        for m in staging.mixers:
            existing_m = self.mixers.get(m.name)
            if existing_m is not None:
                duplicate(f"mixer {m.name!r}", existing_m.plugin)
                continue
            self.mixers[m.name] = m
        for fm in staging.feature_maps:
            existing_f = self.feature_maps.get(fm.name)
            if existing_f is not None:
                duplicate(f"feature map {fm.name!r}", existing_f.plugin)
                continue
            self.feature_maps[fm.name] = fm

    def origin(self, plugin: str) -> str:
        """Where plugin ``plugin`` came from: ``"built-in"`` or ``"<distribution> <version>"``."""
        info = self.plugins.get(plugin)
        if info is None or info.builtin:
            return "built-in" if info is not None else "unknown"
        return f"{info.distribution or 'unknown distribution'} {info.version or ''}".rstrip()

    def describe_plugin(self, plugin: str) -> str:
        """``'name' (built-in)`` or ``'name' (distribution <dist> <version>)``, for messages."""
        origin = self.origin(plugin)
        return f"{plugin!r} ({origin if origin in ('built-in', 'unknown') else 'distribution ' + origin})"

    def describe_backend(self, backend: Backend) -> str:
        """``backend 'name' of op 'op' (plugin 'p' (distribution d v))``, for messages."""
        return f"backend {backend.name!r} of op {backend.op!r} (plugin {self.describe_plugin(backend.plugin)})"

    # -- adding and removing backends at run time ---------------------------------------------------
    def register_backend(
        self,
        backend: Backend | str,
        name: str | None = None,
        fn: Callable[..., Any] | None = None,
        *,
        override: bool = False,
        plugin: str | None = None,
        **fields: Any,
    ) -> Backend | None:
        """Add a backend after loading (tests, a plugin's own set-up): ``register_backend(Backend(...))`` or
        ``register_backend(op, name, fn, priority=..., devices=..., check_available=..., ...)``.

        The backend is checked as one a plugin registers. It is recorded as ``plugin``'s (default: the
        ``Backend``'s own ``plugin``, else ``RUNTIME_PLUGIN``), which decides whether ``"auto"`` may pick it.
        A backend of that op and name already registered is replaced only with ``override=True``; the one it
        replaces is returned (``None`` if none), so that it can be put back. The registry's caches (resolved
        backends, availability) are dropped.
        """
        return self._register_backend(backend, name, fn, override=override, plugin=plugin, **fields)[1]

    def _register_backend(
        self,
        backend: Backend | str,
        name: str | None,
        fn: Callable[..., Any] | None,
        *,
        override: bool,
        plugin: str | None,
        **fields: Any,
    ) -> tuple[Backend, Backend | None]:
        if isinstance(backend, Backend):
            if name is not None or fn is not None or fields:
                raise TypeError("register_backend(Backend(...)) takes no name, fn or other Backend fields")
        else:
            try:
                backend = Backend(op=backend, name=name, fn=fn, **fields)  # type: ignore[arg-type]
            except TypeError as exc:
                raise TypeError(f"register_backend: {exc}") from None
        backend = _checked_backend(backend, plugin or backend.plugin or RUNTIME_PLUGIN)
        existing = self.backends.get(backend.op, {}).get(backend.name)
        if existing is not None and not override:
            raise RegistrationError(
                f"{self.describe_backend(existing)} is already registered; pass override=True to replace it "
                f"with the one from plugin {self.describe_plugin(backend.plugin)}"
            )
        self.backends.setdefault(backend.op, {})[backend.name] = backend
        self._forget(backend.op, backend.name)
        return backend, existing

    def unregister_backend(self, op: str, name: str) -> Backend:
        """Remove backend ``name`` of ``op`` and return it; an unknown one is a ``KeyError`` listing the installed."""
        installed = self.backends.get(op, {})
        if name not in installed:
            raise KeyError(f"no backend {name!r} is registered for op {op!r}; installed: {sorted(installed)}")
        removed = installed.pop(name)
        if not installed:
            del self.backends[op]
        self._forget(op, name)
        return removed

    @contextlib.contextmanager
    def temporary_backend(
        self,
        backend: Backend | str,
        name: str | None = None,
        fn: Callable[..., Any] | None = None,
        *,
        override: bool = False,
        plugin: str | None = None,
        **fields: Any,
    ) -> Iterator[Backend]:
        """``register_backend(...)`` for the ``with`` block only (for tests): yields the backend as registered;
        on exit it is removed and the one it replaced (``override=True``) is put back."""
        added, previous = self._register_backend(backend, name, fn, override=override, plugin=plugin, **fields)
        try:
            yield added
        finally:
            if self.backends.get(added.op, {}).get(added.name) is added:
                self.unregister_backend(added.op, added.name)
            if previous is not None:
                self.register_backend(previous, override=True)

    def _forget(self, op: str, name: str) -> None:
        """Drop what the registry cached about backend ``name`` of ``op`` (it was added, replaced or removed)."""
        self._availability.pop((op, name), None)
        self._resolved.clear()

    # -- queries -----------------------------------------------------------------------------
    def unavailable_reason(self, backend: Backend) -> str | None:
        """Why ``backend`` cannot run on this machine (cached), or ``None``."""
        key = (backend.op, backend.name)
        if key not in self._availability:
            reason = None
            if backend.check_available is not None:
                try:
                    reason = backend.check_available()
                except PLUGIN_FAILURES as exc:
                    reason = f"its availability check raised {_failure(exc)}"
            self._availability[key] = reason
        return self._availability[key]

    # -- which backends "auto" may pick ----------------------------------------------------------
    def is_builtin(self, plugin: str) -> bool:
        """Whether ``plugin`` is one of the built-ins (``DEFAULT_PLUGINS``, or those given to ``load``)."""
        info = self.plugins.get(plugin)
        return info is not None and info.builtin

    def allow_plugin_backends(self, plugins: bool | str | Iterable[str] = True) -> None:
        """Let ``backend="auto"`` pick third-party backends for ops that have a built-in backend.

        ``True``: every plugin's; ``False``: none (the default, unless ``SEQMIXERS_AUTO_PLUGINS`` says
        otherwise); a plugin name or names: those plugins' backends. A backend named explicitly
        (``backend="fla"``) is used whatever this says.
        """
        if isinstance(plugins, bool):
            allowed: bool | frozenset[str] = True if plugins else frozenset()
        elif isinstance(plugins, str):
            allowed = frozenset({plugins})
        else:
            allowed = frozenset(plugins)
            if not all(isinstance(p, str) for p in allowed):
                raise TypeError(f"plugins must be True, False or plugin names (str), got {sorted(map(repr, allowed))}")
        self.auto_plugins = allowed
        self._resolved.clear()

    def _auto_allowed(self, plugin: str) -> bool:
        allowed = self.auto_plugins
        return allowed is True or (isinstance(allowed, frozenset) and plugin in allowed)

    def auto_candidates(self, op: str) -> list[Backend]:
        """The backends of ``op`` that ``"auto"`` may pick (whether or not they can run here).

        For an op with a built-in backend: the built-ins and the backends of the plugins allowed by
        ``allow_plugin_backends`` (so that installing a plugin cannot take over every model). For an op
        without one (a plugin's own op): the backends of the plugins that register a mixer using the op,
        and of allowed plugins; when there are none of those either, every backend of the op.
        """
        installed = list(self.backends.get(op, {}).values())
        if any(self.is_builtin(b.plugin) for b in installed):
            return [b for b in installed if self.is_builtin(b.plugin) or self._auto_allowed(b.plugin)]
        owners = {m.plugin for m in self.mixers.values() if op in m.ops}
        own = [b for b in installed if b.plugin in owners or self._auto_allowed(b.plugin)]
        return own or installed

    def describe_backends(self, op: str) -> str:
        """One line per installed backend of ``op``: availability, priority, plugin, and whether "auto" skips it."""
        rows = []
        eligible = {b.name for b in self.auto_candidates(op)}
        for b in sorted(self.backends.get(op, {}).values(), key=lambda b: -b.priority):
            reason = self.unavailable_reason(b)
            state = "available" if reason is None else f"unavailable: {reason}"
            skipped = "" if b.name in eligible else f"; not picked by 'auto' ({_AUTO_HINT})"
            plugin = self.describe_plugin(b.plugin)
            rows.append(f"  {b.name!r} (priority {b.priority}, plugin {plugin}): {state}{skipped}")
        return "\n".join(rows) if rows else "  (none)"

    def resolve_backend(self, op: str, backend: str, *, device: torch.device, dtype: torch.dtype, mode: str) -> Backend:
        """The backend to run ``op`` with: ``backend`` by name, or ``"auto"`` for the best one.

        Successful choices are cached (dropped when ``register_backend``/``unregister_backend`` change the
        registry), which keeps the per-token cost of recurrent decoding low.
        """
        key = (op, backend, device.type, dtype, mode)
        chosen = self._resolved.get(key)
        if chosen is None:
            chosen = self._resolved[key] = self._resolve(op, backend, device=device, dtype=dtype, mode=mode)
        return chosen

    def _resolve(self, op: str, backend: str, *, device: torch.device, dtype: torch.dtype, mode: str) -> Backend:
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a str ('auto' or a backend name), got {type(backend).__name__}")
        candidates = self.backends.get(op, {})
        if not candidates:
            raise ValueError(f"no backend is registered for op {op!r}; registered ops: {sorted(self.backends)}")
        if backend == "auto":
            for b in sorted(self.auto_candidates(op), key=lambda b: -b.priority):
                if self.unavailable_reason(b) is None and b.unsupported_reason(device, dtype, mode) is None:
                    return b
            raise ValueError(
                f"no installed backend of op {op!r} that 'auto' may pick can run mode {mode!r} on a {device.type} "
                f"device with dtype {dtype}; installed backends:\n{self.describe_backends(op)}"
            )
        if backend not in candidates:
            raise ValueError(
                f"unknown backend {backend!r} for op {op!r}; expected 'auto' or one of "
                f"{sorted(candidates)}. Installed backends:\n{self.describe_backends(op)}"
            )
        chosen = candidates[backend]
        reason = self.unavailable_reason(chosen)
        if reason is not None:
            raise ValueError(
                f"backend {backend!r} for op {op!r} is unavailable: {reason}. "
                f"Installed backends:\n{self.describe_backends(op)}"
            )
        reason = chosen.unsupported_reason(device, dtype, mode)
        if reason is not None:
            raise ValueError(f"backend {backend!r} for op {op!r} cannot take these inputs: it {reason}")
        return chosen

    def available(self) -> dict[str, list[str]]:
        """Mixer name -> names of the backends (of the mixer's ops) that can run on this machine."""
        out = {}
        for name, spec in sorted(self.mixers.items()):
            names: list[str] = []
            for op in spec.ops:
                for b in sorted(self.backends.get(op, {}).values(), key=lambda b: -b.priority):
                    if self.unavailable_reason(b) is None and b.name not in names:
                        names.append(b.name)
            out[name] = names
        return out

    def get_feature_map(self, name: str) -> FeatureMap:
        """The registered feature map ``name``; an unknown name lists the registered ones."""
        if not isinstance(name, str) or name not in self.feature_maps:
            raise ValueError(f"unknown feature map {name!r}; registered feature maps: {sorted(self.feature_maps)}")
        return self.feature_maps[name]

    # -- building mixers ---------------------------------------------------------------------
    def mixer_options(self, name: str) -> list[str] | None:
        """The keyword options mixer ``name``'s factory accepts (after ``d_model``), or ``None`` for any."""
        try:
            params = list(inspect.signature(self.mixers[name].factory).parameters.values())
        except (TypeError, ValueError):  # a builtin or C factory: it checks its options itself
            return None
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            return None
        return [p.name for p in params[1:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]

    def check_backend_name(self, ops: Iterable[str], backend: object, owner: str, *, describe: bool = False) -> None:
        """``backend`` must be ``"auto"`` or a backend registered for each of ``ops`` (those of ``owner``, named in
        the message); ``describe`` adds the installed backends to the message. The one check the registry, the
        mixers' ``set_backend`` and the model configs share."""
        if backend == "auto":
            return
        if not isinstance(backend, str):
            raise TypeError(
                f"backend of {owner} must be a str ('auto' or a backend name), got {type(backend).__name__}"
            )
        for op in ops:
            installed = self.backends.get(op, {})
            if backend not in installed:
                listing = f". Installed backends:\n{self.describe_backends(op)}" if describe else ""
                raise ValueError(
                    f"unknown backend {backend!r} for {owner} (op {op!r}); expected 'auto' or one of "
                    f"{sorted(installed)}{listing}"
                )

    def check_mixer_backend(self, name: str, backend: object) -> None:
        """``backend`` must be ``"auto"`` or a backend registered for every op of mixer ``name`` and available
        here (whether it takes the inputs' device, dtype and mode is known only at the first call)."""
        spec = self.mixers[name]
        self.check_backend_name(spec.ops, backend, f"mixer {name!r}", describe=True)
        if backend == "auto":
            return
        for op in spec.ops:
            reason = self.unavailable_reason(self.backends[op][backend])
            if reason is not None:
                raise ValueError(
                    f"backend {backend!r} for mixer {name!r} (op {op!r}) is unavailable: {reason}. "
                    f"Installed backends:\n{self.describe_backends(op)}"
                )

    def build(self, name: str, d_model: int, **options: Any) -> Any:
        """Build mixer ``name``: unknown options and an unknown or unavailable ``backend`` fail here."""
        if not isinstance(name, str) or name not in self.mixers:
            close = difflib.get_close_matches(name, list(self.mixers), n=1) if isinstance(name, str) else []
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown mixer {name!r}{hint}; registered mixers: {sorted(self.mixers)}")
        accepted = self.mixer_options(name)
        if accepted is not None:
            for key in options:
                if key not in accepted:
                    close = difflib.get_close_matches(key, accepted, n=1)
                    hint = f" (did you mean {close[0]!r}?)" if close else ""
                    raise TypeError(
                        f"unknown option {key!r}{hint} for mixer {name!r} (plugin "
                        f"{self.describe_plugin(self.mixers[name].plugin)}); its options: {accepted}"
                    )
        if "backend" in options:
            self.check_mixer_backend(name, options["backend"])
        token = _BUILDING.set(self)  # the mixer checks its backend against this registry, not the process's
        try:
            return self.mixers[name].factory(d_model, **options)
        finally:
            _BUILDING.reset(token)


_REGISTRY: Registry | None = None
_BUILDING: contextvars.ContextVar[Registry | None] = contextvars.ContextVar("seqmixers_building", default=None)


def current_registry() -> Registry:
    """The registry building a mixer right now (``Registry.build``), else the process-wide one."""
    return _BUILDING.get() or get_registry()


def get_registry() -> Registry:
    """The process-wide registry, loaded on first use."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = Registry().load()
    return _REGISTRY


def reset_registry() -> None:
    """Forget the loaded registry, so that the next use re-discovers plugins (for tests)."""
    global _REGISTRY
    _REGISTRY = None


def resolve_backend(op: str, backend: str, *, device: torch.device, dtype: torch.dtype, mode: str) -> Backend:
    """Module-level shortcut for ``get_registry().resolve_backend``."""
    return get_registry().resolve_backend(op, backend, device=device, dtype=dtype, mode=mode)


def allow_plugin_backends(plugins: bool | str | Iterable[str] = True) -> None:
    """Let ``backend="auto"`` pick third-party backends (all, or those of the named plugins) for ops that have
    a built-in backend; ``False`` restores the default, built-ins only. See ``Registry.allow_plugin_backends``."""
    get_registry().allow_plugin_backends(plugins)


def available() -> Mapping[str, list[str]]:
    """Mixer name -> names of the backends that can serve it on this machine."""
    return get_registry().available()


def build(name: str, d_model: int, **options: Any) -> Any:
    """Build the registered mixer ``name`` (``num_heads``, ``backend`` and mixer-specific options)."""
    return get_registry().build(name, d_model, **options)
