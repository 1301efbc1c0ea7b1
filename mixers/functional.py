"""Public functional ops: validate inputs once, then dispatch to a registered backend.

The names and signatures here are a stable API that mixers, other issues and plugins rely on.
Layout everywhere: ``[B, T, H, D]`` (batch, time, heads, head dim). Backends receive validated inputs,
so each backend stays a plain tensor function.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mixers.registry import resolve_backend

MODES = ("parallel", "chunkwise", "recurrent")
DEFAULT_CHUNK_SIZE = 64


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype recurrent states are kept in: float32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def _shape(t: Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_mode(mode: str, chunk_size: int | None) -> int | None:
    """Validate ``mode`` and ``chunk_size``; return the chunk size to use (``None`` unless chunkwise)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
            raise TypeError(f"chunk_size must be an int >= 1 or None, got {type(chunk_size).__name__} {chunk_size!r}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if mode != "chunkwise":
        return None
    return DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size


def check_qkv(q: Tensor, k: Tensor, v: Tensor) -> tuple[int, int, int, int, int]:
    """Check ``q, k: [B, T, H, Dk]`` and ``v: [B, T, H, Dv]``; return ``(B, T, H, Dk, Dv)``."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have rank 4 [B, T, H, D], got rank {t.dim()} with shape {_shape(t)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q [B, T, H, Dk] = {_shape(q)}, got {_shape(k)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, T, H, Dv] with B, T, H = {tuple(q.shape[:3])} as in q, got {_shape(v)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, T, H, Dk = q.shape
    return B, T, H, Dk, v.shape[-1]


def check_state(
    state: Tensor | None, name: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device
) -> None:
    """Check that a state tensor has exactly the expected shape, dtype and device."""
    if state is None:
        return
    if not isinstance(state, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(state).__name__}")
    if tuple(state.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {_shape(state)}")
    if state.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {state.dtype}")
    if state.device != device:
        raise ValueError(f"{name} must be on device {device}, got {state.device}")


def check_gamma(gamma: Tensor | float | Sequence[float], H: int, device: torch.device) -> Tensor:
    """Return ``gamma`` as a float64 tensor ``[H]`` on ``device``, after checking 0 < gamma <= 1.

    Python floats are checked on the host, so a mixer passing its decays as floats costs no device sync.
    """
    if isinstance(gamma, (int, float)) and not isinstance(gamma, bool):
        gamma = [float(gamma)] * H
    if isinstance(gamma, Tensor):
        g = gamma.detach()
        if g.dim() == 0:
            g = g.expand(H)
        if g.dim() != 1 or g.shape[0] != H:
            raise ValueError(f"gamma must have shape [H] = [{H}], got {_shape(g)}")
        g = g.to(device=device, dtype=torch.float64)
        if bool((~((g > 0) & (g <= 1))).any()):  # also catches NaN
            raise ValueError(f"gamma must lie in (0, 1], got {g.tolist()}")
        return g
    if not isinstance(gamma, Sequence) or not all(
        isinstance(x, (int, float)) and not isinstance(x, bool) for x in gamma
    ):
        raise TypeError(f"gamma must be a tensor [H], a float or a sequence of floats, got {gamma!r}")
    if len(gamma) != H:
        raise ValueError(f"gamma must have H = {H} values, got {len(gamma)}")
    if not all(0 < x <= 1 for x in gamma):  # NaN fails the comparison too
        raise ValueError(f"gamma must lie in (0, 1], got {list(gamma)}")
    return torch.tensor(gamma, dtype=torch.float64, device=device)


def retention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gamma: Tensor | float | Sequence[float],
    *,
    mode: str,
    chunk_size: int | None = None,
    initial_state: Tensor | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Retention: ``o_t = sum_{s<=t} gamma^(t-s) (q_t . k_s) v_s + gamma^(t+1) q_t S_0``.

    Arguments:
        q, k: ``[B, T, H, Dk]``, already rotated and scaled (that is the mixer's job).
        v: ``[B, T, H, Dv]``.
        gamma: per-head decay ``[H]`` (or one float for all heads), ``0 < gamma <= 1``.
        mode: ``"parallel"`` (O(T^2), one matmul), ``"chunkwise"`` (parallel inside chunks of
            ``chunk_size`` tokens, recurrent across them; any chunk size, default 64) or
            ``"recurrent"`` (token by token). All three compute the same function.
        initial_state: ``[B, H, Dk, Dv]`` state ``S_0`` from an earlier call, or ``None`` for zeros.
        backend: a backend name, or ``"auto"`` for the best available one for these inputs.

    Returns:
        ``(o, final_state)``: ``o`` is ``[B, T, H, Dv]`` in the dtype of ``q``; ``final_state`` is
        ``S_T = gamma^T S_0 + sum_s gamma^(T-1-s) k_s^T v_s``, ``[B, H, Dk, Dv]`` in float32
        (float64 for float64 inputs), ready to be passed back as ``initial_state``.
    """
    B, T, H, Dk, Dv = check_qkv(q, k, v)
    chunk = check_mode(mode, chunk_size)
    g = check_gamma(gamma, H, q.device)
    check_state(initial_state, "initial_state", (B, H, Dk, Dv), state_dtype(q.dtype), q.device)
    impl = resolve_backend("retention", backend, device=q.device, dtype=q.dtype, mode=mode)
    return impl.fn(q, k, v, g, mode=mode, chunk_size=chunk, initial_state=initial_state)
