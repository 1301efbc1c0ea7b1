"""The registry of ops, backends, mixers and feature maps: one object made of three parts.

- ``mixers.catalogue``: what is registered, as data (``Backend``, ``MixerSpec``, ``FeatureMap``, ``Catalogue``);
- ``mixers.plugins``: loading the plugins (``PluginLoader``: the built-ins in ``DEFAULT_PLUGINS``, then every entry
  point of the ``seqmixers`` group, each isolated);
- ``mixers.selection``: the policy (``Selection``: "auto", devices, which plugin backends "auto" may pick).

``get_registry()`` is the process-wide one, loaded lazily and once. The registry holds data: it never imports an
op or a backend (plugins, the built-ins included, register them through the hooks of ``mixers.hookspecs``).
"""

from __future__ import annotations

import contextvars
import difflib
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from mixers.catalogue import Backend
from mixers.plugins import PluginLoader
from mixers.selection import Selection


class Registry(PluginLoader, Selection):
    """Mixers, backends and feature maps from all plugins, with where each came from and what failed."""

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
