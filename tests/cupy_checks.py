"""Checks shared by the cupy backend's tests, on the CPU emulator and on a GPU.

- ``PoisonedOutputs``: every tensor the backend allocates for a kernel to fill starts as NaN, with
  sentinel guards on both sides, so an element the kernel does not write, or one it writes out of
  bounds, fails the test.
- ``lay_out``: inputs as views into larger NaN-filled buffers (padded, or stored head-major), so that a
  read outside the tensor poisons the result and the kernels' stride handling is exercised.
- Per-dtype tolerances, and the comparison with the torch backend on the same inputs: the kernels
  must be as close to the float64 reference as the torch backend is.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from mixers.backends.cupy import _retention
from mixers.testing.asserts import max_rel_error, norm_rel_error

GUARD = 64  # sentinel elements before and after every output
SENTINEL = -1152.0  # exact in float32, float16 and bfloat16, and no value a kernel produces by chance

# Largest error allowed, relative to the same sum over absolute values (as tests/strategies.py measures):
# float32 computes in float32 like the torch backend; 16-bit outputs are rounded once at the end. The
# state is float32 for every input dtype.
OUTPUT_RTOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}
STATE_RTOL = {torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 5e-5}
LAYOUTS = ("contiguous", "padded", "head_major")


def rtol_for(table: dict[torch.dtype, float], dtype: torch.dtype, T: int) -> float:
    """``table[dtype]``, widened for long sequences where it is float32 rounding that dominates: the
    recurrent form adds T terms one after another, so its rounding error grows like sqrt(T)."""
    base = table[dtype]
    return base * max(1.0, math.sqrt(T / 256)) if base <= 1e-4 else base


class PoisonedOutputs:
    """While active (``with``), outputs are NaN-filled views with ``GUARD`` sentinels on each side."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.buffers: list[tuple[Tensor, int]] = []
        monkeypatch.setattr(_retention, "_empty", self._empty)

    def _empty(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        n = math.prod(shape)
        buf = torch.full((n + 2 * GUARD,), SENTINEL, dtype=dtype, device=device)
        buf[GUARD : GUARD + n] = float("nan")
        self.buffers.append((buf, n))
        return buf[GUARD : GUARD + n].view(shape)

    def check(self) -> None:
        """Every output element written (no NaN left), and no guard element touched."""
        for buf, n in self.buffers:
            guards = torch.cat([buf[:GUARD], buf[GUARD + n :]])
            assert (guards == SENTINEL).all(), "a kernel wrote outside its output"
            assert not torch.isnan(buf[GUARD : GUARD + n]).any(), "a kernel left output elements unwritten"
        self.buffers.clear()


def lay_out(x: Tensor, layout: str) -> Tensor:
    """``x [B, T, H, D]`` with the same values, stored as ``layout`` says, in a NaN-filled buffer."""
    if layout == "contiguous":
        return x.contiguous()
    B, T, H, D = x.shape
    if layout == "padded":  # a slice of a wider, longer tensor (as from a fused projection)
        buf = torch.full((B, T + 3, H, D + 8), float("nan"), dtype=x.dtype, device=x.device)
        view = buf[:, 1 : T + 1, :, 3 : D + 3]
    elif layout == "head_major":  # stored [B, H, T, D], seen as [B, T, H, D]
        buf = torch.full((B, H, T + 2, D), float("nan"), dtype=x.dtype, device=x.device)
        view = buf[:, :, :T].transpose(1, 2)
    else:
        raise ValueError(layout)
    view.copy_(x)
    return view


def close_to_reference(
    got: Tensor, ref: Tensor, scale: Tensor, rtol: float, what: str, baseline: Tensor | None = None
) -> None:
    """Finite, within ``rtol`` of ``ref`` relative to ``scale`` (sums of absolute values), and, given the
    torch backend's result ``baseline`` on the same inputs, no further from ``ref`` than it is (RMS,
    with 50% slack for rounding ties and a floor far below any 16-bit rounding)."""
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    err = max_rel_error(got, ref, scale)
    assert err <= rtol, f"{what}: relative error {err:.3e} > {rtol:.1e}"
    if baseline is not None:
        mine, theirs = norm_rel_error(got, ref), norm_rel_error(baseline, ref)
        assert mine <= 1.5 * theirs + 1e-6, f"{what}: RMS error {mine:.3e}, torch backend's {theirs:.3e}"
