"""seqmixers: token mixers (retention and friends) behind one interface, with pluggable backends.

Public API:
- ``mixers.functional``: the ops (``retention``, ``linear_attention``, ``softmax_attention``), stable names
  that backends implement.
- ``mixers.build(name, d_model, **options)`` / ``mixers.available()``: registered mixers and backends.
- ``mixers.allow_plugin_backends(...)``: let ``backend="auto"`` pick third-party backends (off by default).
- ``mixers.TokenMixer`` / ``mixers.MixerState``: the interface every mixer implements.
- ``mixers.hookimpl`` / ``mixers.Backend``: what a plugin needs to register a backend or mixer.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from mixers.hookspecs import hookimpl  # pluggy only

if TYPE_CHECKING:  # pragma: no cover - imports for type checkers; at run time they load on first use
    from mixers import functional
    from mixers.catalogue import Backend
    from mixers.interface import MixerState, TokenMixer
    from mixers.registry import allow_plugin_backends, available, build, get_registry

# The public names load on first use (PEP 562): torch takes seconds to import, and ``import mixers`` happens
# wherever a submodule is imported: the pytest plugin (loaded into every pytest run through ``pytest11``),
# ``python -m mixers``, the ``seqmixers`` command's ``--help``. None of those may pay for torch up front.
_WHERE = {
    "functional": "mixers.functional",
    "MixerState": "mixers.interface",
    "TokenMixer": "mixers.interface",
    "Backend": "mixers.catalogue",
    "allow_plugin_backends": "mixers.registry",
    "available": "mixers.registry",
    "build": "mixers.registry",
    "get_registry": "mixers.registry",
}

__all__ = [
    "Backend",
    "MixerState",
    "TokenMixer",
    "allow_plugin_backends",
    "available",
    "build",
    "functional",
    "get_registry",
    "hookimpl",
]
__version__ = "0.2.0"


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'mixers' has no attribute {name!r}")
    module = importlib.import_module(_WHERE[name])
    value = module if module.__name__ == f"mixers.{name}" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})
