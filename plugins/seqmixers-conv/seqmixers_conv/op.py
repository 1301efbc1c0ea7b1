"""The short causal convolution op: its ``Op`` (validation; seqmixers does dispatch and output checks), torch backend.

``y_t[c] = bias[c] + sum_{j<K} weight[c, j] * x_{t-K+1+j}[c]``: each channel is convolved with its own
K taps over the current and the K-1 previous inputs; ``weight[:, K-1]`` multiplies the current one.
Inputs before the sequence come from ``initial_state`` (the K-1 inputs that preceded it, oldest first)
or are zero. The final state is the last K-1 inputs seen, so a split with the state handed over equals
one pass exactly: this op has no accumulated state at all, only a window.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F
from mixers.ops import Op, OpCall
from mixers.ops.base import ContextParallelForm
from mixers.ops.checks import check_mode, check_state
from torch import Tensor

OP = "short_conv"


class ShortConvBackend(Protocol):
    """What a backend of the op is called with (validated) and returns: ``(y, final_state)``."""

    def __call__(
        self,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        *,
        mode: str,
        chunk_size: int | None,
        initial_state: Tensor | None,
    ) -> tuple[Tensor, Tensor]: ...


def prepare(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    mode: str,
    chunk_size: int | None = None,
    initial_state: Tensor | None = None,
) -> OpCall:
    """The op's validation: all the plugin writes to get dispatch and output checks from seqmixers."""
    if not isinstance(x, Tensor) or x.dim() != 3 or not x.is_floating_point():
        shape = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be a floating-point tensor [B, T, C], got {shape}")
    B, T, C = x.shape
    if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.shape[0] != C or weight.shape[1] < 1:
        shape = list(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"weight must be [C, K] with C = {C} channels as in x and K >= 1 taps, got {shape}")
    K = weight.shape[1]
    for name, t, shape in (("weight", weight, (C, K)), ("bias", bias, (C,))):
        if t is not None:
            check_state(t, name, shape, x.dtype, x.device)
    chunk = check_mode(mode, chunk_size)
    check_state(initial_state, "initial_state", (B, K - 1, C), x.dtype, x.device)
    return OpCall(
        args=(x, weight, bias),
        kwargs={"mode": mode, "chunk_size": chunk, "initial_state": initial_state},
        device=x.device,
        dtype=x.dtype,
        mode=mode,
        o=("y", (B, T, C), "[B, T, C]", x.dtype),
        state=[("final_state", (B, K - 1, C), "[B, K-1, C]", x.dtype)],
        describe=lambda: f"x {list(x.shape)}, weight {list(weight.shape)}",
    )


def _tail(arguments: dict[str, Any]) -> tuple[Tensor]:
    """What a rank's tokens hand the next ranks: its last ``min(L, K-1)`` inputs."""
    x, K = arguments["x"], arguments["weight"].shape[1]
    return (x[:, x.shape[1] - min(x.shape[1], K - 1) :],)


def _window(cp: Any, gathered: tuple[Tensor, ...], arguments: dict[str, Any]) -> dict[str, Any]:
    """The K-1 inputs before this rank's tokens (zeros before the sequence), from the earlier ranks' tails."""
    (tails,) = gathered  # [ranks, B, m, C]
    return {**arguments, "initial_state": cp.window_before(tails, arguments["weight"].shape[1] - 1)}


SHORT_CONV = Op(
    OP,
    prepare,
    ShortConvBackend,
    state_type=Tensor,
    reference="seqmixers_conv.testing:short_conv_reference",
    testing="seqmixers_conv.testing:SHORT_CONV_SPEC",
    description="short causal depthwise convolution (state: the last K-1 inputs)",
    sequences=("x",),
    context_parallel=ContextParallelForm(_tail, _window),
)


def short_conv(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    mode: str,
    chunk_size: int | None = None,
    initial_state: Tensor | None = None,
    backend: str = "auto",
    cu_seqlens: Tensor | None = None,
    attention_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Causal depthwise convolution, continuing from a window of earlier inputs.

    Arguments:
        x: ``[B, T, C]``.
        weight: ``[C, K]``, one K-tap filter per channel, in the dtype of ``x``; bias: ``[C]`` or ``None``.
        mode: ``"parallel"`` (one convolution), ``"chunkwise"`` (one convolution per chunk of ``chunk_size``
            tokens, the window carried between them) or ``"recurrent"`` (token by token). All three compute
            the same function.
        initial_state: ``[B, K-1, C]``, the inputs before ``x`` (oldest first), in the dtype of ``x``;
            ``None`` for zeros.
        backend: a backend name, or ``"auto"``.
        cu_seqlens, attention_mask: packed sequences (``x [1, T, C]``, a window per sequence) or a padded batch,
            as for ``mixers.functional.retention`` (the ``Op`` object does it, for every backend).

    Returns:
        ``(y, final_state)``: ``y`` is ``[B, T, C]`` in the dtype of ``x``; ``final_state`` is the last K-1
        inputs, ``[B, K-1, C]`` in the dtype of ``x``, ready to be passed back as ``initial_state``.
    """
    return SHORT_CONV(
        x, weight, bias, mode=mode, chunk_size=chunk_size, initial_state=initial_state, backend=backend,
        cu_seqlens=cu_seqlens, attention_mask=attention_mask,
    )  # fmt: skip


# -- the torch backend ---------------------------------------------------------------------------------
def _conv(window: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """All outputs of ``x [B, T, C]`` after ``window [B, K-1, C]``, by one depthwise ``conv1d``."""
    padded = torch.cat([window, x], dim=1).transpose(1, 2)  # (B, C, K-1+T)
    return F.conv1d(padded, weight[:, None, :], bias, groups=weight.shape[0]).transpose(1, 2)  # (B, T, C)


def torch_short_conv(
    x: Tensor, weight: Tensor, bias: Tensor | None, *, mode: str, chunk_size: int | None, initial_state: Tensor | None
) -> tuple[Tensor, Tensor]:
    """The torch backend: computes in float32 (float64 for float64 inputs); differentiable by autograd."""
    B, T, C = x.shape
    K = weight.shape[1]
    cd = torch.promote_types(x.dtype, torch.float32)
    window = x.new_zeros(B, K - 1, C) if initial_state is None else initial_state
    if T == 0:
        return x.new_zeros(B, 0, C), window
    xc, w, b, win = x.to(cd), weight.to(cd), None if bias is None else bias.to(cd), window.to(cd)
    if mode == "parallel":
        y = _conv(win, xc, w, b)
    elif mode == "chunkwise":
        outs = []
        for start in range(0, T, chunk_size):
            piece = xc[:, start : start + chunk_size]
            outs.append(_conv(win, piece, w, b))
            win = torch.cat([win, piece], dim=1)[:, piece.shape[1] :]  # the last K-1 inputs so far
        y = torch.cat(outs, dim=1)
    else:  # recurrent
        outs = []
        for t in range(T):
            taps = torch.cat([win, xc[:, t : t + 1]], dim=1)  # (B, K, C), oldest first
            y_t = (taps * w.T).sum(dim=1)
            outs.append(y_t if b is None else y_t + b)
            win = taps[:, 1:]
        y = torch.stack(outs, dim=1)
    final = torch.cat([window, x], dim=1)[:, T:]  # the last K-1 inputs, exactly as given
    return y.to(x.dtype), final
