"""The selection policy: which backend runs a call ("auto" or a name), whether a backend can run here, and
which third-party backends "auto" may pick.

Environment variable ``SEQMIXERS_AUTO_PLUGINS``: which third-party plugins ``backend="auto"`` may pick for an op
that has a built-in backend. Unset, ``""`` or ``"0"``: none (a named backend always works); ``"1"``: all;
``"a,b"``: the plugins so named. ``allow_plugin_backends()`` sets the same from Python.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch

from mixers.catalogue import Backend, Catalogue
from mixers.plugins import PLUGIN_FAILURES, _failure

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


class Selection(Catalogue):
    """Choosing backends from the catalogue, with the caches that keep a decode step's choice cheap."""

    def __init__(self) -> None:
        super().__init__()
        self._availability: dict[tuple[str, str], str | None] = {}
        self._resolved: dict[tuple, Backend] = {}
        self.auto_plugins: bool | frozenset[str] = _auto_plugins_from_env()

    def _forget(self, op: str, name: str) -> None:
        """Drop what was cached about backend ``name`` of ``op`` (it was added, replaced or removed)."""
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

    def cannot_run(
        self, backend: Backend, device: torch.device | str, dtype: torch.dtype | None = None, mode: str | None = None
    ) -> str | None:
        """Why ``backend`` cannot run here on ``device`` (its library or driver missing, or not made for that
        device type, dtype or mode: ``None`` for any), or ``None``: the one check configs and "auto" share."""
        reason = self.unavailable_reason(backend)
        if reason is None and (unsupported := backend.unsupported_reason(device, dtype, mode)) is not None:
            reason = f"it {unsupported}"
        return reason

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
                if self.cannot_run(b, device, dtype, mode) is None:
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
