"""The ops: one folder each, holding everything that defines the op.

``mixers/ops/<op>/__init__.py`` has the op's backend signature (a ``Protocol``), its validation (``prepare``),
its state type, the ``Op`` object and its ``register_ops`` hook (the folder is a built-in plugin, listed in
``mixers.plugins.DEFAULT_PLUGINS``, as a third-party op's module would be an entry point); ``reference.py`` its
float64 reference; ``testing.py`` its hypothesis cases and conformance spec. ``mixers.functional`` calls the
``Op`` objects; the registry holds them; the conformance kit reads their reference and spec.
"""

from __future__ import annotations

from mixers.ops.base import Op, OpCall, check_backend_outputs

__all__ = ["Op", "OpCall", "check_backend_outputs"]
