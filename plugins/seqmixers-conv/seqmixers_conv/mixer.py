"""``ShortConvolution``: the ``"short_conv"`` token mixer.

``y = W_O (act(conv_K(X W_U)) * swish(X W_G))``: a projection, a short causal depthwise convolution
(the op in ``seqmixers_conv.op``), an activation and an optional swish gate. Short convolutions mix
the few most recent tokens; hybrids pair them with attention or retention layers for longer range.
Its state is the last K-1 projected inputs, whatever the sequence length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from mixers.interface import MixerState, TokenMixer
from torch import Tensor, nn

from seqmixers_conv.op import short_conv

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "identity": lambda x: x}


class ShortConvolution(TokenMixer):
    """A short causal depthwise convolution mixer.

    Arguments:
        d_model: model width (also the number of convolution channels).
        kernel_size: K, the number of taps (the current token and K-1 before it); >= 1.
        activation: ``"silu"``, ``"gelu"`` or ``"identity"``, after the convolution.
        gate: multiply by ``swish(X W_G)`` before the output projection.
        bias: a bias in the convolution.
        backend: the ``short_conv`` op's backend (``"auto"`` picks the best available).
        chunk_size: default chunk size for ``mode="chunkwise"``.

    The state's ``op`` is the ``short_conv`` op's: the last K-1 projected inputs ``[B, K-1, d_model]``.
    """

    ops = ("short_conv",)
    packs = True  # forward takes cu_seqlens (see mixers.interface.mix_packed)
    op_state_type = Tensor

    def __init__(
        self,
        d_model: int,
        *,
        kernel_size: int = 4,
        activation: str = "silu",
        gate: bool = True,
        bias: bool = True,
        backend: str = "auto",
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("d_model", d_model), ("kernel_size", kernel_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.d_model, self.kernel_size, self.activation, self.gate = d_model, kernel_size, activation, gate
        self.chunk_size = chunk_size
        self.set_backend(backend)
        self.in_proj = nn.Linear(d_model, 2 * d_model if gate else d_model, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(d_model, kernel_size))
        self.conv_bias = nn.Parameter(torch.zeros(d_model)) if bias else None
        self.out_proj = nn.Linear(d_model, d_model, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.uniform_(self.conv_weight, -(self.kernel_size**-0.5), self.kernel_size**-0.5)  # as nn.Conv1d
        if self.conv_bias is not None:
            nn.init.zeros_(self.conv_bias)
        nn.init.xavier_uniform_(self.in_proj.weight)
        nn.init.xavier_uniform_(self.out_proj.weight)

    def init_state(
        self,
        batch_size: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        max_len: int | None = None,  # the window has a fixed size: nothing to preallocate
    ) -> MixerState:
        window = torch.zeros(batch_size, self.kernel_size - 1, self.d_model, device=device, dtype=dtype)
        return MixerState.start(window, batch_size, device=device)

    def forward(
        self,
        x: Tensor,
        state: MixerState | None = None,
        *,
        mode: str = "parallel",
        chunk_size: int | None = None,
        cu_seqlens: Tensor | None = None,
    ) -> tuple[Tensor, MixerState]:
        """``cu_seqlens``: ``x [1, T, d_model]`` holds packed sequences (the op restarts its window at each);
        the state then has a row per sequence. A mixer without positions needs nothing more for cu_seqlens."""
        B, T = self.check_input(x)
        cu_seqlens = self.check_packing(x, cu_seqlens)
        state = self.check_state(state, B, x.device, cu_seqlens)
        u, *g = self.in_proj(x).chunk(2 if self.gate else 1, dim=-1)  # (B, T, d_model) each
        y, window = short_conv(
            u,
            self.conv_weight,
            self.conv_bias,
            mode=mode,
            chunk_size=chunk_size if chunk_size is not None else self.chunk_size,
            initial_state=None if state is None else state.op,
            backend=self.backend,
            cu_seqlens=cu_seqlens,
        )
        y = ACTIVATIONS[self.activation](y)
        if self.gate:
            y = y * F.silu(g[0])
        return self.out_proj(y), self.next_state(state, x, window, cu_seqlens)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, kernel_size={self.kernel_size}, activation={self.activation!r}, "
            f"gate={self.gate}, backend={self.backend!r}"
        )
