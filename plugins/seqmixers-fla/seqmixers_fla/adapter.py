"""Adapters from the seqmixers op contracts to fla's ``simple_gla`` kernels.

fla's simple gated linear attention computes, per head, ``S_t = exp(g_t) S_{t-1} + k_t^T v_t`` and
``o_t = scale * q_t S_t`` on ``[B, T, H, D]`` tensors, from an initial state ``[B, H, Dk, Dv]``:

- gated retention is that recurrence with the op's ``g`` and ``scale = 1`` (the op's q and k arrive scaled).
  fla's chunk kernels take differences of running sums of g inside a chunk, where ``-inf - -inf`` is NaN, so a
  ``-inf`` (a token that forgets the state) goes in as ``FORGET``, whose exponential is 0 in float32. A NaN or
  +inf in g is a fault: it goes in as 0 and is marked NaN where it reaches, as in the torch backend.
- retention is gated retention with ``g_t = log(gamma_h)`` for every token. Each head has its own gamma, any
  value in (0, 1]. (fla's ``chunk_retention`` is not used: it fixes the decays from the number of heads.)
- linear attention is the recurrence with no decay (``g = None``). fla's own normalisation has no
  initial normaliser and no guard, so the numerator comes from the kernel and the normaliser
  ``q_t . (z_0 + sum_{s<=t} k_s)`` is a float32 cumulative sum here, guarded as the op documents.

``mode="recurrent"`` uses ``fused_recurrent_simple_gla``, the other modes ``chunk_simple_gla`` (whose
chunk size is its own; ``chunk_size`` only changes how the torch backend splits the work, not the
result). Non-finite inputs: fla's chunk kernels multiply a chunk's values by the zeroed scores of later
positions (``0 * NaN`` is NaN), and every backward meets a later NaN with a zero gradient, so the kernels run
on the finite parts of q, k, v and the non-finite entries are marked NaN where they reach
(``mixers.backends.nonfinite``): outputs and gradients before a NaN stay as they were. Inputs arrive
validated by ``mixers.functional``. All arguments are passed by keyword: the names
used (``q, k, v, g, scale, initial_state, output_final_state``) are common to the fla sources read for
this adapter (an older release with ``head_first`` and a current one with ``g_gamma``); not yet run on a GPU.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from mixers.backends import nonfinite
from mixers.backends.torch_gated_retention import finite_decays  # where a NaN or +inf log decay reaches
from mixers.backends.torch_linear_attention import guard  # the op's documented denominator guard
from mixers.ops.checks import state_dtype
from torch import Tensor

Kernel = Callable[..., tuple[Tensor, Tensor]]

# The log decay a -inf (forget the state) goes in as: exp(-110) is 0 in float32, so the state is forgotten
# exactly. No lower: a decay inside a chunk is a difference of running sums, whose rounding grows with their size.
FORGET = -110.0


def _kernels() -> tuple[Kernel, Kernel]:
    """``(chunk_simple_gla, fused_recurrent_simple_gla)``, imported on first use (fla needs Triton)."""
    from fla.ops.simple_gla import chunk_simple_gla, fused_recurrent_simple_gla

    return chunk_simple_gla, fused_recurrent_simple_gla


def simple_gla(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, initial_state: Tensor | None, *, mode: str
) -> tuple[Tensor, Tensor]:
    """``S_t = exp(g_t) S_{t-1} + k_t^T v_t``, ``o_t = q_t S_t`` through fla; returns ``(o, S_T)``."""
    chunk, recurrent = _kernels()
    kernel = recurrent if mode == "recurrent" else chunk
    with warnings.catch_warnings():
        # fla warns when T < H, guessing at a head-first layout; ours is always [B, T, H, D] (decoding has T = 1).
        warnings.filterwarnings("ignore", message="Input tensor shape suggests potential format mismatch")
        return kernel(q=q, k=k, v=v, g=g, scale=1.0, initial_state=initial_state, output_final_state=True)


def _decayed(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, initial_state: Tensor | None, *, mode: str
) -> tuple[Tensor, Tensor]:
    """``S_t = exp(g_t) S_{t-1} + k_t^T v_t``, ``o_t = q_t S_t`` for finite float32 log decays ``g [B, T, H]``,
    with non-finite q, k, v marked where they reach: ``(o, S_T)`` as the op returns them."""
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    sd = state_dtype(q.dtype)
    if T == 0:  # nothing to run; the state passes through
        return q.new_zeros(B, 0, H, Dv), q.new_zeros(B, H, Dk, Dv, dtype=sd) if initial_state is None else initial_state
    (q, k, v), found = nonfinite.finite_parts(q, k, v)
    o, final = simple_gla(q, k, v, g.contiguous(), initial_state, mode=mode)
    return nonfinite.marked(found, o.to(q.dtype), final.to(sd))


def retention(
    q: Tensor, k: Tensor, v: Tensor, gamma: Tensor, *, mode: str, chunk_size: int | None, initial_state: Tensor | None
) -> tuple[Tensor, Tensor]:
    """The ``retention`` op (see ``mixers.functional.retention``) through fla; ``gamma`` is float64 ``[H]``."""
    B, T, H, _ = q.shape
    g = torch.log(gamma).to(torch.float32)[None, None, :].expand(B, T, H)  # <= 0
    return _decayed(q, k, v, g, initial_state, mode=mode)


def gated_retention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    *,
    mode: str,
    chunk_size: int | None,
    initial_state: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """The ``gated_retention`` op (see ``mixers.functional.gated_retention``) through fla; ``g [B, T, H]`` are the
    log decays, ``-inf`` passed as ``FORGET`` and a NaN or +inf as 0, marked NaN where it reaches."""
    g, faults = finite_decays(g)  # NaN or +inf as 0, and NaN marks where they reach (None: nothing to mark)
    o, final = _decayed(q, k, v, g.clamp(min=FORGET).to(torch.float32), initial_state, mode=mode)
    return (o, final) if faults is None else faults.marked(o, final)


def linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mode: str,
    chunk_size: int | None,
    initial_state: tuple[Tensor, Tensor] | None,
    normalize: bool,
    eps: float,
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """The ``linear_attention`` op (see ``mixers.functional.linear_attention``) through fla."""
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    sd = state_dtype(q.dtype)
    kv0, z0 = (None, q.new_zeros(B, H, Dk, dtype=sd)) if initial_state is None else initial_state
    if T == 0:
        kv = q.new_zeros(B, H, Dk, Dv, dtype=sd) if kv0 is None else kv0
        return q.new_zeros(B, 0, H, Dv), (kv, z0)
    (q, k, v), found = nonfinite.finite_parts(q, k, v)
    num, kv = simple_gla(q, k, v, None, kv0, mode=mode)  # (B, T, H, Dv): q_t (kv_0 + sum_{s<=t} k_s^T v_s)
    z = z0[:, None] + k.to(sd).cumsum(dim=1)  # (B, T, H, Dk): z_0 + sum_{s<=t} k_s
    if normalize:
        den = (q.to(sd) * z).sum(dim=-1)  # (B, T, H)
        o = num.to(sd) / guard(den, eps)[..., None]
    else:
        o = num
    o, kv, z = nonfinite.marked(found, o.to(q.dtype), kv.to(sd), z[:, -1])
    return o, (kv, z)
