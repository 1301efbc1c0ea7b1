"""Numerical comparisons with messages that say what differed, by how much, and against what tolerance."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

# Relative tolerances (max abs error / max abs of the scale) per dtype of the computation.
RTOL: dict[torch.dtype, float] = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def max_rel_error(actual: Tensor, expected: Tensor, scale: Tensor | None = None) -> float:
    """``max |actual - expected| / max |scale|`` in float64; ``scale`` defaults to ``expected``.

    Pass as ``scale`` the same computation on absolute values (``sum |terms|``) where sums may cancel:
    rounding error is bounded relative to that, not to the (possibly tiny) result.
    """
    a, e = actual.detach().double(), expected.detach().double()
    if not e.numel():
        return 0.0
    s = e if scale is None else scale.detach().double()
    err = (a.cpu() - e.cpu()).abs().max().item()
    top = s.abs().max().item()
    return err / top if top > 0 else err


def norm_rel_error(actual: Tensor, expected: Tensor) -> float:
    """``||actual - expected|| / ||expected||`` in float64 (fla's measure for low-precision kernels)."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    scale = e.norm().item()
    err = (a - e).norm().item()
    return err / scale if scale > 0 else err


def assert_rel_close(
    actual: Tensor, expected: Tensor, rtol: float, what: str = "", scale: Tensor | None = None
) -> None:
    """Same shape, finite, and ``max_rel_error <= rtol``."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = max_rel_error(actual, expected, scale)
    assert err <= rtol, f"{what}: relative error {err:.3e} > {rtol:.1e}"


def _assert_parts_close(a: Any, b: Any, rtol: float, what: str) -> None:
    if hasattr(b, "held") and hasattr(a, "held"):  # a cache: compare what it holds, not its free slots
        a, b = a.held(), b.held()
    if isinstance(b, Tensor):
        assert isinstance(a, Tensor), f"{what}: {type(a).__name__} is not a tensor"
        assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} != {b.dtype}"
        if b.is_floating_point():
            assert_rel_close(a, b, rtol, what)
        else:  # positions, lengths: exact
            assert torch.equal(a, b), f"{what}: {a.tolist()} != {b.tolist()}"
    elif isinstance(b, tuple):
        assert isinstance(a, tuple) and len(a) == len(b), f"{what}: {type(a).__name__} != {type(b).__name__}"
        names = getattr(type(b), "_fields", range(len(b)))
        for name, x, y in zip(names, a, b, strict=True):
            _assert_parts_close(x, y, rtol, f"{what}.{name}")
    else:
        assert a == b, f"{what}: {a!r} != {b!r}"


def assert_states_close(got: Any, want: Any, rtol: float, what: str = "state") -> None:
    """Mixer states (dataclasses): same type; tensor fields (and the tensors of an op's state) close with the
    same dtype, integer tensors (positions) equal, other fields equal; a cache compared by what it holds."""
    assert type(got) is type(want), f"{what}: {type(got).__name__} != {type(want).__name__}"
    for f in dataclasses.fields(want):
        _assert_parts_close(getattr(got, f.name), getattr(want, f.name), rtol, f"{what}.{f.name}")


def assert_raises_mentioning(
    call: Callable[[], object], fragments: Iterable[str], what: str, errors: tuple[type[BaseException], ...] = ()
) -> None:
    """``call()`` raises one of ``errors`` (default ``ValueError, TypeError``) whose message has every fragment."""
    errors = errors or (ValueError, TypeError)
    try:
        call()
    except errors as exc:
        missing = [f for f in fragments if f not in str(exc)]
        assert not missing, f"{what}: error {exc!r} does not mention {missing}"
        return
    raise AssertionError(f"{what}: no {' or '.join(e.__name__ for e in errors)} was raised")
