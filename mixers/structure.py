"""Walking the tensors inside a state: tensors, tuples and NamedTuples of them, ``None``.

A leaf module: states (``MixerState``, op states), packing and the training code all walk them the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor


def map_structure(value: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """``value`` with ``fn`` applied to every tensor in it (tensors, tuples and NamedTuples of them, ``None``)."""
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, tuple):
        items = [map_structure(v, fn) for v in value]
        return type(value)._make(items) if hasattr(type(value), "_make") else tuple(items)
    return value


def tensors_in(value: Any) -> list[Tensor]:
    """Every tensor in ``value`` (as ``map_structure`` walks it)."""
    found: list[Tensor] = []
    map_structure(value, lambda t: found.append(t) or t)
    return found
