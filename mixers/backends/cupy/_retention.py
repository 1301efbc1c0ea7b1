"""Retention through the CUDA kernels: launch geometry, the backward pass, and the backend function.

The launch code takes a ``Runtime`` (``_runtime.py``) instead of reaching for CuPy itself, so the tests
can run the very same code, kernels included, on the CPU through the emulator in ``tests/cuda_emu``.

Backward. With ``dO`` the gradient of ``o`` and ``dS`` that of the final state, the gradients are three
retentions of the same shape as the forward one, each run by the same chunk kernel:

- ``dq_t = sum_{s<=t} gamma^(t-s) (dO_t . v_s) k_s + gamma^(t+1) S_0 dO_t``: forward retention of
  ``(q, k, v) = (dO, v, k)`` from the state ``S_0^T``;
- ``dv_t = sum_{u>=t} gamma^(u-t) (k_t . q_u) dO_u + gamma^(T-1-t) k_t dS``: the same in reversed time,
  ``(q, k, v) = (k, q, dO)`` from ``dS``, where the incoming state is not decayed before the first
  (that is, last) token (``delta = 0``); its final state is the gradient of ``S_0``,
  ``gamma^T dS + sum_u gamma^(u+1) q_u^T dO_u``;
- ``dk_t = sum_{u>=t} gamma^(u-t) (v_t . dO_u) q_u + gamma^(T-1-t) dS v_t``: reversed time again,
  ``(q, k, v) = (v, dO, q)`` from ``dS^T``.

Transposed states are passed as strided views, so nothing is copied.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from mixers.backends import nonfinite, torch_retention
from mixers.backends.cupy._runtime import Runtime, cupy_runtime

CHUNK = 64  # positions per chunk in the kernels (any T: the last chunk may be shorter)
KEY_TILE = 64  # key dimensions per shared-memory tile
MAX_HEAD_DIM = 512  # the recurrent kernel keeps at most 32 state rows per thread, in 16 row groups
_SIMT_THREADS = 256
_MMA_THREADS = 128
_DTYPE_NAMES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


def _smem_bytes(kind: str, bv: int, dk: int) -> int:
    """Dynamic shared memory of a chunk kernel; mirrors simt_smem_floats / mma_smem_bytes in the .cu files."""
    dk_pad = math.ceil(dk / KEY_TILE) * KEY_TILE
    if kind == "simt":
        return 4 * (68 + 3 * CHUNK * (KEY_TILE + 1) + CHUNK * (bv + 1) + dk_pad * (bv + 1))
    return 4 * 68 + 2 * (2 * CHUNK + 6 * bv) * (KEY_TILE + 8) + 4 * dk_pad * (bv + 4)


def _chunk_kind(rt: Runtime, dtype: torch.dtype) -> str:
    """Tensor cores for bfloat16 where the GPU has them; float32 and float16 on the CUDA cores in float32
    (float16's exponent range is too narrow for the split operands, see retention_chunk_mma.cu)."""
    return "mma" if dtype == torch.bfloat16 and rt.tensor_cores else "simt"


def _value_tile(rt: Runtime, kind: str, dk: int, dv: int, blocks_per_tile: int) -> int | None:
    """The value-tile width (64 or 32) of a chunk launch, or ``None`` if neither fits in shared memory.

    64 halves how often a block recomputes the scores; 32 doubles the number of blocks and halves their
    shared memory, which pays when 64-wide tiles would leave multiprocessors idle, or fit only one block
    on a multiprocessor where two 32-wide ones would fit.
    """
    fitting = [bv for bv in (64, 32) if _smem_bytes(kind, bv, dk) <= rt.max_smem]
    if not fitting:
        return None
    if len(fitting) == 2:
        too_few_blocks = blocks_per_tile * math.ceil(dv / 64) < rt.num_sms
        half = rt.max_smem // 2
        one_per_sm = _smem_bytes(kind, 64, dk) > half >= _smem_bytes(kind, 32, dk)
        if too_few_blocks or one_per_sm:
            return 32
    return fitting[0]


def kernels_fit(rt: Runtime, dtype: torch.dtype, dk: int, dv: int) -> bool:
    """Whether the kernels take these head sizes on this device, forward and backward (which runs chunk
    launches with key size ``dk`` and ``dv``); otherwise the backend computes with the torch backend."""
    if max(dk, dv) > MAX_HEAD_DIM:
        return False
    kind = _chunk_kind(rt, dtype)
    return all(_smem_bytes(kind, 32, d) <= rt.max_smem for d in (dk, dv))


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A new tensor for a kernel to fill (the tests swap this for one that poisons it and guards its ends)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _bth(x: Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _unit_last(x: Tensor) -> Tensor:
    """The kernels take any strides but need the last (head) dimension contiguous."""
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def _state_args(s: Tensor | None) -> tuple[int, int, int, int, int]:
    if s is None:
        return (0, 0, 0, 0, 0)
    return (s.data_ptr(), *s.stride())


def chunk_retention(
    rt: Runtime,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gamma: Tensor,
    initial_state: Tensor | None,
    *,
    reverse: bool = False,
    delta: int = 1,
    final_state: bool = True,
    kind: str | None = None,
) -> tuple[Tensor, Tensor | None]:
    """One chunk-kernel launch: ``(o, S_out)`` as described in chunk.cuh (``kind`` forces simt or mma)."""
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    kind = kind or _chunk_kind(rt, q.dtype)
    bv = _value_tile(rt, kind, Dk, Dv, B * H)
    if bv is None:
        raise ValueError(f"retention kernels: key size {Dk} needs more shared memory than this GPU has")
    o = _empty((B, T, H, Dv), q.dtype, q.device)
    s_out = _empty((B, H, Dk, Dv), torch.float32, q.device) if final_state else None
    args: Sequence[int | float] = (
        q.data_ptr(), *_bth(q), k.data_ptr(), *_bth(k), v.data_ptr(), *_bth(v), o.data_ptr(), *_bth(o),
        *_state_args(initial_state), 0 if s_out is None else s_out.data_ptr(), gamma.data_ptr(),
        B, T, H, Dk, Dv, int(reverse), delta,
    )  # fmt: skip
    threads = _MMA_THREADS if kind == "mma" else _SIMT_THREADS
    name = f"retention_chunk_{kind}_{_DTYPE_NAMES[q.dtype]}_bv{bv}"
    grid = B * H * math.ceil(Dv / bv)
    rt.launch(f"retention_chunk_{kind}", name, grid, (threads, 1), _smem_bytes(kind, bv, Dk), args)
    return o, s_out


def recurrent_retention(
    rt: Runtime, q: Tensor, k: Tensor, v: Tensor, gamma: Tensor, initial_state: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Token by token in one launch (the decode step when T = 1); see retention_recurrent.cu."""
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    row_groups = min(16, math.ceil(Dk / 16))  # 16 state rows per thread up to Dk = 256, then up to 32
    rows = 16 if Dk <= 256 else 32
    o = _empty((B, T, H, Dv), q.dtype, q.device)
    s_out = _empty((B, H, Dk, Dv), torch.float32, q.device)
    args: Sequence[int | float] = (
        q.data_ptr(), *_bth(q), k.data_ptr(), *_bth(k), v.data_ptr(), *_bth(v), o.data_ptr(), *_bth(o),
        *_state_args(initial_state), s_out.data_ptr(), gamma.data_ptr(), B, T, H, Dk, Dv,
    )  # fmt: skip
    smem = 4 * (2 * Dk + row_groups * 33)
    grid = B * H * math.ceil(Dv / 32)
    name = f"retention_recurrent_{_DTYPE_NAMES[q.dtype]}_r{rows}"
    rt.launch("retention_recurrent", name, grid, (32, row_groups), smem, args)
    return o, s_out


def forward(
    rt: Runtime, q: Tensor, k: Tensor, v: Tensor, gamma: Tensor, initial_state: Tensor | None, mode: str
) -> tuple[Tensor, Tensor]:
    """Retention in ``mode`` (parallel and chunkwise are the same function: both run the chunk kernel)."""
    if mode == "recurrent":
        return recurrent_retention(rt, q, k, v, gamma, initial_state)
    o, s = chunk_retention(rt, q, k, v, gamma, initial_state)
    assert s is not None
    return o, s


class RetentionFunction(torch.autograd.Function):
    """Forward through the kernels of ``mode``; backward through three chunk launches (module docstring)."""

    @staticmethod
    def forward(
        ctx, q: Tensor, k: Tensor, v: Tensor, initial_state: Tensor | None, gamma: Tensor, mode: str, rt: Runtime
    ) -> tuple[Tensor, Tensor]:
        o, s = forward(rt, q, k, v, gamma, initial_state, mode)
        ctx.save_for_backward(q, k, v, initial_state, gamma)
        ctx.rt = rt
        return o, s

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do: Tensor, ds: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, s0, gamma = ctx.saved_tensors
        rt: Runtime = ctx.rt
        need_q, need_k, need_v, need_s0 = ctx.needs_input_grad[:4]
        dq = dk = dv = ds0 = None
        if need_q:
            dq, _ = chunk_retention(rt, do, v, k, gamma, None if s0 is None else s0.mT, final_state=False)
        if need_v or need_s0:
            dv, ds0 = chunk_retention(rt, k, q, do, gamma, ds, reverse=True, delta=0, final_state=need_s0)
        if need_k:
            dk, _ = chunk_retention(rt, v, do, q, gamma, ds.mT, reverse=True, delta=0, final_state=False)
        return dq, dk, (dv if need_v else None), ds0, None, None, None


def retention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gamma: Tensor,
    *,
    mode: str,
    chunk_size: int | None,
    initial_state: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """The ``cupy`` backend of ``mixers.functional.retention`` (inputs already validated).

    ``chunk_size`` selects nothing here: every mode computes the same function, and the kernels use
    their own chunk of 64 positions. Empty inputs, and head sizes the kernels do not take (above 512,
    or too large for this GPU's shared memory), are computed by the torch backend.
    """
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    if T == 0 or B * H * Dk * Dv == 0:
        return torch_retention.retention(q, k, v, gamma, mode=mode, chunk_size=chunk_size, initial_state=initial_state)
    rt = cupy_runtime(q.device)
    if not kernels_fit(rt, q.dtype, Dk, Dv):
        return torch_retention.retention(q, k, v, gamma, mode=mode, chunk_size=chunk_size, initial_state=initial_state)
    return run(rt, q, k, v, gamma, mode=mode, initial_state=initial_state)


def run(
    rt: Runtime, q: Tensor, k: Tensor, v: Tensor, gamma: Tensor, *, mode: str, initial_state: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Retention on ``rt``, differentiable when any input requires a gradient.

    The kernels' forward excludes later non-finite keys and values itself; their backward products would meet
    a later NaN with a zero gradient, so with gradients they run on the finite parts of q, k, v and the others
    are marked where they reach (``mixers.backends.nonfinite``)."""
    gamma = gamma.contiguous()
    if not nonfinite.recording(q, k, v, initial_state):
        return forward(rt, q, k, v, gamma, initial_state, mode)
    (q, k, v), found = nonfinite.finite_parts(q, k, v)
    return nonfinite.marked(found, *RetentionFunction.apply(q, k, v, initial_state, gamma, mode, rt))
