"""seqmixers: token mixers (retention and friends) behind one interface, with pluggable backends.

Public API:
- ``mixers.functional``: the ops (``retention``, ``linear_attention``, ``softmax_attention``), stable names
  that backends implement.
- ``mixers.build(name, d_model, **options)`` / ``mixers.available()``: registered mixers and backends.
- ``mixers.allow_plugin_backends(...)``: let ``backend="auto"`` pick third-party backends (off by default).
- ``mixers.TokenMixer`` / ``mixers.MixerState``: the interface every mixer implements.
- ``mixers.hookimpl`` / ``mixers.Backend``: what a plugin needs to register a backend or mixer.
"""

from mixers import functional
from mixers.hookspecs import hookimpl
from mixers.interface import MixerState, TokenMixer
from mixers.registry import Backend, allow_plugin_backends, available, build, get_registry

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
