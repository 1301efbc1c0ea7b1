"""Norms, FFNs and the pre-norm residual block ``x + mixer(norm(x))``, ``x + ffn(norm(x))`` (RetNet, section 2.3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import mixers
from mixers import MixerState, TokenMixer
from mixers.interface import mix_packed
from mixers.packing import Packing
from models.config import ConfigError, LayerSpec, ModelConfig


class RMSNorm(nn.Module):
    """``x / rms(x) * weight`` over the last dimension."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps)
    raise ConfigError(f"norm must be 'layernorm' or 'rmsnorm', got {kind!r}")


class MLP(nn.Module):
    """The paper's FFN: ``gelu(x W1 + b1) W2 + b2``."""

    def __init__(self, d_model: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, hidden)
        self.proj = nn.Linear(hidden, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class SwiGLU(nn.Module):
    """``(silu(x W_g) * x W_u) W_2`` without biases (Shazeer 2020; LLaMA)."""

    def __init__(self, d_model: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, 2 * hidden, bias=False)  # gate and up in one matmul
        self.proj = nn.Linear(hidden, d_model, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.fc(x).chunk(2, dim=-1)  # (B, T, hidden) each
        return self.dropout(self.proj(F.silu(gate) * up))


FFN_CLASSES = {"gelu": MLP, "swiglu": SwiGLU}


def build_mixer(spec: LayerSpec, d_model: int, index: int) -> TokenMixer:
    """The registered mixer of layer ``index``; a failure names the layer, the mixer and its options."""
    try:
        mixer = mixers.build(spec.mixer, d_model, **spec.options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"layers[{index}]: could not build mixer {spec.mixer!r} with d_model={d_model} and options "
            f"{spec.options}: {exc}"
        ) from exc
    if not isinstance(mixer, TokenMixer):
        raise ConfigError(
            f"layers[{index}]: mixer {spec.mixer!r} built a {type(mixer).__name__}, not a mixers.TokenMixer"
        )
    return mixer


class Block(nn.Module):
    """``x = x + drop(mixer(norm1(x)))``; ``x = x + ffn(norm2(x))``, carrying the mixer's state."""

    def __init__(self, config: ModelConfig, spec: LayerSpec, index: int) -> None:
        super().__init__()
        d = config.d_model
        self.norm1 = make_norm(config.norm, d, config.norm_eps)
        self.mixer = build_mixer(spec, d, index)
        self.norm2 = make_norm(config.norm, d, config.norm_eps)
        self.ffn = FFN_CLASSES[config.ffn](d, spec.ffn_dim, config.dropout)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: Tensor,
        state: MixerState | None = None,
        *,
        mode: str = "parallel",
        chunk_size: int | None = None,
        cu_seqlens: Tensor | Packing | None = None,
    ) -> tuple[Tensor, MixerState]:
        """``cu_seqlens``: ``x [1, T, D]`` holds packed sequences; the model hands every block the one ``Packing``
        it checked, which goes on to the mixer as it is."""
        if cu_seqlens is None:
            y, state = self.mixer(self.norm1(x), state, mode=mode, chunk_size=chunk_size)  # (B, T, D)
        else:
            y, state = mix_packed(self.mixer, self.norm1(x), state, cu_seqlens, mode=mode, chunk_size=chunk_size)
        x = x + self.dropout(y)
        x = x + self.ffn(self.norm2(x))
        return x, state
