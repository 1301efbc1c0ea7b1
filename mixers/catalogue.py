"""The catalogue: what the plugins registered (ops, backends, mixers, feature maps, plugins), as data.

``Backend``, ``MixerSpec`` and ``FeatureMap`` are what a plugin registers; ``Catalogue`` holds them with where each
came from, and adds, replaces and removes backends at run time (checked as a plugin's are). It imports nothing of
the library: which backend runs a call is ``mixers.selection``'s business, loading plugins ``mixers.plugins``'.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch


class RegistrationError(ValueError):
    """A plugin registered something malformed or a duplicate."""


class BackendOutputError(RuntimeError):
    """A backend returned outputs of the wrong structure, shape, dtype or device (checked at the op boundary)."""


# The plugin a backend added with ``Registry.register_backend`` is recorded as, when it names none.
RUNTIME_PLUGIN = "<runtime>"


@dataclass(frozen=True)
class Backend:
    """One implementation of one op.

    ``fn`` follows its op's ``Op.backend_signature`` (a ``Protocol`` in ``mixers/ops/<op>/``) and receives inputs
    already validated by the op. ``check_available()`` returns ``None`` when the backend can run here, else the
    reason it cannot (it is called once and cached). ``devices``/``dtypes``/``modes`` of ``None`` mean "any".
    ``"auto"`` picks the highest ``priority`` among available backends that support the inputs, of those it may
    pick (``mixers.selection``). ``traceable=False`` says that dynamo cannot trace ``fn`` (CuPy, ctypes, numpy...):
    while compiling, the op then calls it through one opaque ``torch.library`` custom op (``mixers.ops.opaque``),
    so a model using it still compiles with ``fullgraph=True``; eagerly it is called directly. ``packs=True``
    says that ``fn`` takes ``cu_seqlens`` (a ``mixers.packing.Packing``) and computes every sequence of a packed
    row in one call; otherwise the op runs it once per sequence.
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

    def unsupported_reason(
        self, device: torch.device | str, dtype: torch.dtype | None = None, mode: str | None = None
    ) -> str | None:
        """Why this backend cannot take inputs on ``device`` (of ``dtype``, in ``mode``: ``None`` for any), or
        ``None`` if it can."""
        device_type = (device if isinstance(device, str) else device.type).split(":")[0]
        if self.devices is not None and device_type not in self.devices:
            return f"runs on {sorted(self.devices)} devices, not {device_type!r}"
        if dtype is not None and self.dtypes is not None and dtype not in self.dtypes:
            return f"takes dtypes {sorted(str(d) for d in self.dtypes)}, not {dtype}"
        if mode is not None and self.modes is not None and mode not in self.modes:
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
        raise RegistrationError(f"register() expected a mixers.Backend, got {type(backend).__name__}")
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
    if not isinstance(backend.packs, bool):
        raise RegistrationError(f"Backend {backend.op}/{backend.name}: packs must be a bool, got {backend.packs!r}")
    return backend if backend.plugin == plugin else dataclasses.replace(backend, plugin=plugin)


BackendRegistrar = Callable[[Backend], None]
OpRegistrar = Callable[[Any], None]  # register(mixers.ops.Op(...))
MixerRegistrar = Callable[..., None]
FeatureMapRegistrar = Callable[..., None]


class Catalogue:
    """Ops, backends, mixers and feature maps by name, and the plugins they came from."""

    def __init__(self) -> None:
        self.ops: dict[str, Any] = {}  # name -> mixers.ops.Op
        self.backends: dict[str, dict[str, Backend]] = {}
        self.mixers: dict[str, MixerSpec] = {}
        self.feature_maps: dict[str, FeatureMap] = {}
        self.plugins: dict[str, PluginInfo] = {}

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

    # -- which backends "auto" may pick ----------------------------------------------------------
    def is_builtin(self, plugin: str) -> bool:
        """Whether ``plugin`` is one of the built-ins (``DEFAULT_PLUGINS``, or those given to ``load``)."""
        info = self.plugins.get(plugin)
        return info is not None and info.builtin

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
        """Backend ``name`` of ``op`` was added, replaced or removed (what caches it is dropped by a subclass)."""

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
