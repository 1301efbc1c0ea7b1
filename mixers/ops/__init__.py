"""The ops: one folder each, holding everything that defines the op.

``mixers/ops/<op>/__init__.py`` has the op's backend signature (a ``Protocol``), its validation (``prepare``),
its state type and the ``Op`` object; ``reference.py`` its float64 reference; ``testing.py`` its hypothesis
cases and conformance spec. ``mixers.functional`` calls the ``Op`` objects; the registry holds them (this module
registers the built-in ones through the ``register_ops`` hook, as a plugin registers its own); the conformance
kit reads their reference and spec.
"""

from __future__ import annotations

from mixers.hookspecs import hookimpl
from mixers.ops.base import Op, OpCall, check_backend_outputs
from mixers.ops.linear_attention import LINEAR_ATTENTION, LinearState
from mixers.ops.retention import RETENTION
from mixers.ops.softmax_attention import SOFTMAX_ATTENTION, KVCache

__all__ = [
    "BUILTIN_OPS",
    "LINEAR_ATTENTION",
    "RETENTION",
    "SOFTMAX_ATTENTION",
    "KVCache",
    "LinearState",
    "Op",
    "OpCall",
    "check_backend_outputs",
]

BUILTIN_OPS = (RETENTION, LINEAR_ATTENTION, SOFTMAX_ATTENTION)


@hookimpl
def register_ops(register) -> None:  # noqa: ANN001 - an OpRegistrar
    for op in BUILTIN_OPS:
        register(op)
