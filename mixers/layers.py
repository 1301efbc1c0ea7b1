"""The pieces the built-in mixers share: head arithmetic, the per-head norm, the short convolution, the
rotary module, and ``ProjectedMixer``, the frame of projections around an op that each mixer fills in.

Each mixer keeps only what makes it different (its op, its feature map or decays, how q and k are
positioned); parameter names (``in_proj``, ``out_proj``, ``head_norm``, ``conv``) are the same in every
mixer, which is also what saved checkpoints hold.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from mixers import rotary as rope
from mixers.interface import MixerState, TokenMixer, mix_padded
from mixers.ops.checks import check_mode
from mixers.packing import Packing

if TYPE_CHECKING:  # pragma: no cover
    from mixers.ops.base import Op

HEAD_NORMS = ("groupnorm", "rmsnorm")


def resolve_heads(d_model: int, num_heads: int | None, head_dim: int | None, default_head_dim: int) -> tuple[int, int]:
    """``(num_heads, head_dim)`` from whichever of the two is given (the other must divide d_model)."""
    for name, value in (("d_model", d_model), ("num_heads", num_heads), ("head_dim", head_dim)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if num_heads is None and head_dim is None:
        num_heads = max(1, d_model // default_head_dim)
    if head_dim is None:
        if d_model % num_heads:
            raise ValueError(
                f"d_model={d_model} is not divisible by num_heads={num_heads}; pick a divisor or set head_dim"
            )
        head_dim = d_model // num_heads
    if num_heads is None:
        if d_model % head_dim:
            raise ValueError(
                f"d_model={d_model} is not divisible by head_dim={head_dim}; pick a divisor or set num_heads"
            )
        num_heads = d_model // head_dim
    return num_heads, head_dim


def check_value_dim(value_dim: int, num_heads: int) -> int:
    """``value_dim`` (the total value width) if it splits evenly over the heads."""
    if isinstance(value_dim, bool) or not isinstance(value_dim, int) or value_dim < 1 or value_dim % num_heads:
        raise ValueError(f"value_dim must be a positive multiple of num_heads={num_heads}, got {value_dim!r}")
    return value_dim


class HeadNorm(nn.Module):
    """A norm over each head's ``Dv`` values: ``[B, T, H, Dv]`` in, the same shape and memory layout out.

    ``"groupnorm"`` is GroupNorm with H groups (the paper's), i.e. LayerNorm over each head's values with
    per-channel affine weights; ``"rmsnorm"`` is RMSNorm per head (torchscale's). The layout is kept so that
    a following elementwise op (the gate) does any transpose in passing instead of a copy here.
    The affine weights are stored flat, ``[H * Dv]``, as they act on the concatenated heads.
    """

    def __init__(
        self, num_heads: int, head_dim: int, kind: str = "groupnorm", *, affine: bool = True, eps: float = 1e-5
    ) -> None:
        super().__init__()
        if kind not in HEAD_NORMS:
            raise ValueError(f"norm must be one of {HEAD_NORMS}, got {kind!r}")
        self.num_heads, self.head_dim, self.kind, self.eps = num_heads, head_dim, kind, eps
        width = num_heads * head_dim
        self.weight = nn.Parameter(torch.ones(width)) if affine else None
        self.bias = nn.Parameter(torch.zeros(width)) if affine and kind == "groupnorm" else None

    def forward(self, o: Tensor) -> Tensor:
        shape = (self.num_heads, self.head_dim)
        if self.kind == "groupnorm":
            y = F.layer_norm(o, shape[-1:], None, None, self.eps)
            return y if self.weight is None else torch.addcmul(self.bias.view(shape), y, self.weight.view(shape))
        y = F.rms_norm(o, shape[-1:], None, self.eps)  # its own weight could only be (Dv,); ours is per head
        return y if self.weight is None else y * self.weight.view(shape)

    def extra_repr(self) -> str:
        return f"{self.kind}, heads={self.num_heads}, head_dim={self.head_dim}, eps={self.eps}"


class ShortConv(nn.Module):
    """A short causal depthwise convolution over ``[B, T, C]``, then SiLU, with its window handed over.

    ``y_t[c] = silu(sum_{j<K} weight[c, j] * x_{t-K+1+j}[c])``: each channel mixes its own last K inputs.
    Recurrent mixers use it on q, k and v (as fla's and Zoology's strong recurrent models do): a key then
    carries its neighbours, which is what associative recall needs and a decaying sum alone is slow to learn.
    The convolution has no accumulated state, only the last ``K-1`` inputs (oldest first), so every mode
    computes it the same way and a split with the window handed over equals one pass exactly.
    """

    def __init__(self, channels: int, kernel_size: int) -> None:
        super().__init__()
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1:
            raise ValueError(f"conv_size must be a positive int (taps of the short convolution), got {kernel_size!r}")
        self.channels, self.kernel_size = channels, kernel_size
        self.weight = nn.Parameter(torch.empty(channels, kernel_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = self.kernel_size**-0.5  # nn.Conv1d's default for a depthwise kernel
        nn.init.uniform_(self.weight, -bound, bound)

    def init_window(self, batch_size: int, *, device: torch.device | str | None = None, dtype: torch.dtype) -> Tensor:
        return torch.zeros(batch_size, self.kernel_size - 1, self.channels, device=device, dtype=dtype)

    def forward(
        self, x: Tensor, window: Tensor | None = None, cu_seqlens: Packing | None = None
    ) -> tuple[Tensor, Tensor]:
        """``x [B, T, C]`` after ``window [B, K-1, C]`` (``None``: zeros); return ``(y, new window)``.

        With ``cu_seqlens``, ``x [1, T, C]`` holds packed sequences: each starts from its own row of ``window``
        (``[N, K-1, C]``) and the windows returned are per sequence."""
        if cu_seqlens is not None:
            return self._packed(x, window, cu_seqlens)
        B, _, C = x.shape
        want = (B, self.kernel_size - 1, C)
        if window is None:
            window = self.init_window(B, device=x.device, dtype=x.dtype)
        elif not isinstance(window, Tensor) or tuple(window.shape) != want:
            got = list(window.shape) if isinstance(window, Tensor) else type(window).__name__
            raise ValueError(f"the state's conv window must be [B, conv_size - 1, channels] = {list(want)}, got {got}")
        window = window.to(x.dtype)
        if x.shape[1] == 0:  # nothing to convolve (conv1d refuses an input shorter than the kernel)
            return x, window
        xx = torch.cat([window, x], dim=1)  # (B, K-1+T, C)
        # K shifted products: on CPU about twice as fast as a grouped conv1d, forward and backward.
        T, w = x.shape[1], self.weight.to(x.dtype)
        y = xx[:, :T] * w[:, 0]
        for j in range(1, self.kernel_size):
            y = y + xx[:, j : j + T] * w[:, j]
        return F.silu(y), xx[:, xx.shape[1] - (self.kernel_size - 1) :].clone()  # not a view pinning all of xx

    def _packed(self, x: Tensor, window: Tensor | None, cu_seqlens: Packing) -> tuple[Tensor, Tensor]:
        """The convolution of packed sequences: a tap reaching before its sequence's first token reads that
        sequence's window (zeros without one), never the previous sequence's tokens."""
        N, K, C = cu_seqlens.n, self.kernel_size, x.shape[-1]
        if window is not None and (not isinstance(window, Tensor) or tuple(window.shape) != (N, K - 1, C)):
            got = list(window.shape) if isinstance(window, Tensor) else type(window).__name__
            want = [N, K - 1, C]
            raise ValueError(f"the state's conv window must be [N, conv_size - 1, channels] = {want}, got {got}")
        window = self.init_window(N, device=x.device, dtype=x.dtype) if window is None else window.to(x.dtype)
        T = x.shape[1]
        if K == 1 or T == 0:
            return (F.silu(x * self.weight[:, 0].to(x.dtype)) if T else x), window
        xs, w, off = x[0], self.weight.to(x.dtype), cu_seqlens.offsets
        y = xs * w[:, K - 1]  # the current token
        for d in range(1, K):  # the token d back: in the sequence, or in its window
            back = F.pad(xs, (0, 0, d, 0))[:T]
            held = window[cu_seqlens.seq_id, (K - 1 - d + off).clamp(max=K - 2)]
            y = y + torch.where((off >= d)[:, None], back, held) * w[:, K - 1 - d]
        # Each sequence's new window: the last K-1 of (its window, its tokens).
        i = torch.arange(K - 1, device=x.device)
        at = cu_seqlens.lengths[:, None] - (K - 1) + i  # (N, K-1): index into the sequence's tokens, < 0 in the window
        from_x = xs[(cu_seqlens.cu_seqlens[:-1, None] + at).clamp(0, T - 1)]
        from_w = window.gather(1, (cu_seqlens.lengths[:, None] + i).clamp(max=K - 2)[..., None].expand(N, K - 1, C))
        return F.silu(y)[None], torch.where((at >= 0)[..., None], from_x, from_w)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kernel_size={self.kernel_size}"


def conv_window(conv: ShortConv | None, state: object | None) -> Tensor | None:
    """The window a mixer's ``state.conv`` hands to its ``conv`` (``None`` before any token).

    A state from a mixer with a different ``conv_size`` (or none) is refused: reading it as zeros would
    silently compute something else.
    """
    window = None if state is None else state.conv
    if state is not None and (conv is None) != (window is None):
        have = "no short convolution" if conv is None else f"conv_size={conv.kernel_size}"
        held = "a conv window" if window is not None else "no conv window"
        raise ValueError(f"the state holds {held}, but this mixer has {have}: was it made by another mixer's settings?")
    return window


class Rotary(nn.Module):
    """Rotates q and k by position; owns its angles and caches its phases.

    The angles are float64 and kept outside the module's buffers, so ``model.to(bfloat16)`` cannot round
    them. For a fresh sequence (positions ``0..T-1``, the training case) the phases come from a table
    cached per device and dtype, grown to the next power of two when a longer sequence comes; rows at
    their own positions (``pos [B]``, a hand-over or a decode step) compute theirs from ``pos`` directly,
    without a device sync, and so does a compiled graph (where the phases fold into constants).
    Table and direct phases are computed the same way (float64, then rounded), so both give the same bits.
    """

    def __init__(self, head_dim: int, *, layout: str = "interleaved", schedule: str = "rope", base: float = 1e4):
        super().__init__()
        if layout not in rope.LAYOUTS:
            raise ValueError(f"rope_layout must be one of {rope.LAYOUTS}, got {layout!r}")
        self.head_dim, self.layout, self.schedule, self.base = head_dim, layout, schedule, base
        self.theta = rope.angles(head_dim, schedule=schedule, base=base)  # float64 on the CPU
        self._theta_on: dict[torch.device, Tensor] = {}
        self._tables: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def _angles(self, device: torch.device) -> Tensor:
        theta = self._theta_on.get(device)
        if theta is None:
            theta = self._theta_on[device] = self.theta.to(device)
        return theta

    def phases(self, pos: Tensor | None, T: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """``e^{i p theta}`` in the complex ``dtype``: ``[T, D/2]`` for positions ``0..T-1`` (``pos=None``),
        else ``[B, T, D/2]`` for positions ``pos[b] + t`` (``pos [B]``) or ``pos[b, t]`` (``pos [B, T]``)."""
        if pos is None and not torch.compiler.is_compiling():
            key = (device, dtype)
            table = self._tables.get(key)
            if table is None or table.shape[0] < T:
                n = 1 << max(T - 1, 1).bit_length()
                table = self._tables[key] = rope.phases(self._angles(device), 0, n).to(dtype)
            return table[:T]
        one = torch.ones((), dtype=torch.float64, device=device)
        return torch.polar(one, self._angle(pos, T, device)).to(dtype)

    def _angle(self, pos: Tensor | None, T: int, device: torch.device) -> Tensor:
        """``p theta`` in float64 for positions ``0..T-1`` (``[T, D/2]``), ``pos[b] + t`` (``[B, T, D/2]``), or
        ``pos[b, t]`` for a position per token (``pos [B, T]``)."""
        if pos is not None and pos.dim() == 2:  # a position per token (packed sequences)
            p = pos.to(torch.float64)
        elif pos is not None and T == 1:  # a decode step: no arange
            p = pos.to(torch.float64)[:, None]
        else:
            t = torch.arange(T, device=device, dtype=torch.float64)
            p = t if pos is None else pos.to(torch.float64)[:, None] + t
        return p[..., None] * self._angles(device)

    def forward(self, x: Tensor, pos: Tensor | None, factor: Tensor | None = None) -> Tensor:
        """Rotate ``x [B, T, ..., D]`` (``..``: head dimensions) at positions ``pos`` (``None``: ``0..T-1``);
        ``factor`` (real, broadcasting against ``[..., D/2]``) scales the rotation in the same pass."""
        return self.rotate_all([x], pos, factor)[0]

    def rotate_all(self, xs: list[Tensor], pos: Tensor | None, factor: Tensor | None = None) -> list[Tensor]:
        """``forward`` for several tensors of one rank, dtype and length (q and k), with the phases made once."""
        x = xs[0]
        heads = x.dim() - 3  # the dimensions between T and D
        if torch.compiler.is_compiling():  # real arithmetic: inductor generates no code for complex tensors
            angle = self._angle(pos, x.shape[1], x.device)
            angle = angle.view(*angle.shape[:-1], *([1] * heads), angle.shape[-1])
            cos, sin = angle.cos(), angle.sin()
            if factor is not None:
                cos, sin = cos * factor, sin * factor
            return [rope.rotate_real(y, cos, sin, layout=self.layout) for y in xs]
        complex_dtype = torch.complex128 if x.dtype == torch.float64 else torch.complex64
        phase = self.phases(pos, x.shape[1], x.device, complex_dtype)
        phase = phase.view(*phase.shape[:-1], *([1] * heads), phase.shape[-1])
        if factor is not None:
            phase = phase * factor
        return [rope.rotate(y, phase, layout=self.layout) for y in xs]

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, layout={self.layout!r}, schedule={self.schedule!r}, base={self.base}"


class ProjectedMixer(TokenMixer):
    """The frame of the built-in mixers: ``in_proj`` to q, k, v (and a gate), an optional short convolution on
    q, k, v, the op (the subclass's ``forward``), an optional per-head norm and swish gate, and ``out_proj``.

    A subclass sets up its modules with ``init_frame`` and implements ``mix``, calling ``project`` and ``output``
    around its op; ``forward`` checks the inputs and handles packed and padded batches for all of them.

    Context parallelism (``mixers.context_parallel``): a subclass that calls its op (an ``Op``) through ``run_op``
    and sets ``context_parallel = True`` runs split over ranks when a split is installed on it (``self.cp``, by
    ``with context_parallel(group, model=model):``); ``begin`` starts it at the rank's position, ``project``
    fetches the previous ranks' convolution inputs and ``run_op`` runs the op's context-parallel form.
    """

    packs = True  # forward takes cu_seqlens (packed sequences) itself
    context_parallel: ClassVar[bool] = False  # supports mixers.context_parallel (the built-in mixers do)
    widths: list[int]  # of in_proj's output blocks: q, k, v, then the gate if there is one
    in_proj: nn.Linear
    out_proj: nn.Linear
    head_norm: HeadNorm | None
    conv: ShortConv | None
    gate: bool

    @property
    def rotary(self) -> bool:
        """Whether q and k are rotated (a mixer that rotates sets ``self.rope`` to a ``Rotary``)."""
        return getattr(self, "rope", None) is not None

    @property
    def rope_layout(self) -> str | None:
        return self.rope.layout if self.rotary else None

    def init_frame(
        self,
        d_model: int,
        widths: list[int],
        out_width: int,
        *,
        gate: bool = False,
        head_norm: HeadNorm | None = None,
        conv_size: int | None = None,
        bias: bool = False,
        backend: str = "auto",
        chunk_size: int | None = None,
    ) -> None:
        """Build the projections (``widths``: q, k, v; a gate of ``out_width`` is appended when ``gate``), the
        norm and convolution, and check and set the backend and default chunk size."""
        check_mode("chunkwise", chunk_size)
        self.d_model, self.gate, self.chunk_size = d_model, gate, chunk_size
        self.widths = [*widths, *([out_width] if gate else [])]
        self.in_proj = nn.Linear(d_model, sum(self.widths), bias=bias)  # q, k, v (and g) in one matmul
        self.out_proj = nn.Linear(out_width, d_model, bias=bias)
        self.head_norm = head_norm
        self.conv = None if conv_size is None else ShortConv(sum(widths), conv_size)
        self.set_backend(backend)

    def forward(
        self,
        x: Tensor,
        state: MixerState | None = None,
        *,
        mode: str = "parallel",
        chunk_size: int | None = None,
        cu_seqlens: Tensor | Packing | None = None,
        attention_mask: Tensor | None = None,
    ) -> tuple[Tensor, MixerState]:
        """Mix ``x [B, T, d_model]`` from ``state`` (see ``TokenMixer.forward``): the checks, packed sequences
        (``cu_seqlens``: a state row per sequence) and padded batches (``attention_mask``: unpadded, run packed,
        padded back) are done here for every subclass, which computes the rest in ``mix``."""
        if attention_mask is not None:
            if cu_seqlens is not None:
                raise ValueError("give cu_seqlens (packed sequences) or attention_mask (a padded batch), not both")
            return mix_padded(self, x, state, attention_mask, mode=mode, chunk_size=chunk_size)
        B, _ = self.check_input(x)
        cu_seqlens = self.check_packing(x, cu_seqlens)
        state = self.check_state(state, B, x.device, cu_seqlens)
        if self.cp is not None:
            state = self.cp.begin(self, x, state, cu_seqlens)  # at position r L; no op state or window (from the ranks)
        return self.mix(x, state, cu_seqlens, mode, self.chunk(chunk_size))

    def mix(
        self, x: Tensor, state: MixerState | None, cu_seqlens: Packing | None, mode: str, chunk_size: int | None
    ) -> tuple[Tensor, MixerState]:
        """The subclass's computation on checked inputs: ``(y, new state)``."""
        raise NotImplementedError(f"{type(self).__name__} must implement mix()")

    def project(
        self, x: Tensor, state: MixerState | None, cu_seqlens: Packing | None = None
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """``(qkv [B, T, q+k+v widths], gate input or None, the convolution's new window or None)``."""
        qkv_width = sum(self.widths[:3])
        qkv, *g = self.in_proj(x).split([qkv_width, *self.widths[3:]], dim=-1)
        window = conv_window(self.conv, state) if self.cp is None else None
        if self.conv is not None:
            if self.cp is not None:  # the previous ranks' last inputs
                window = self.cp.conv_window(qkv, self.conv.kernel_size - 1)
            qkv, window = self.conv(qkv, window, cu_seqlens)
        return qkv, (g[0] if g else None), window

    def run_op(self, op: Op, *args: Any, **kwargs: Any) -> Any:
        """``op(*args, **kwargs)``, or under context parallelism its context-parallel form."""
        return op(*args, **kwargs) if self.cp is None else self.cp.run(op, *args, **kwargs)

    def output(self, o: Tensor, g: Tensor | None) -> Tensor:
        """``out_proj(gate * norm(o))`` for the op's output ``o [B, T, H, Dv]``."""
        B, T, H, Dv = o.shape
        y = o if self.head_norm is None else self.head_norm(o)  # keeps the op's layout: the gate transposes
        if g is not None:
            y = F.silu(g).view(B, T, H, Dv) * y  # written in the gate's (B, T, H, Dv) layout
        return self.out_proj(rearrange(y, "b t h d -> b t (h d)"))

    def chunk(self, chunk_size: int | None) -> int | None:
        return chunk_size if chunk_size is not None else self.chunk_size

    def frame_repr(self) -> Any:
        return f"conv_size={self.conv and self.conv.kernel_size}, backend={self.backend!r}"
