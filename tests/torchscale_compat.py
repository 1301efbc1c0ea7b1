"""The official RetNet code (torchscale) side by side with ours: import it, and copy weights across.

torchscale is installed with ``--no-deps``: its retention module needs only torch, but the module that
holds ``RetNetRelPos`` imports ``fairscale`` and ``timm`` at the top for things retention never uses
(activation-checkpoint wrappers, ``drop_path``). Those two are stubbed here when they are missing.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from typing import Any

import torch

import mixers
from mixers.retention import MultiScaleRetention


def _stub_missing(name: str, **attrs: Any) -> None:
    if name in sys.modules or importlib.util.find_spec(name.split(".")[0]) is not None:
        return
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        sys.modules.setdefault(".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    for key, value in attrs.items():
        setattr(sys.modules[name], key, value)


def import_torchscale() -> types.SimpleNamespace | None:
    """torchscale's ``MultiScaleRetention``, ``RetNetRelPos`` and ``RetNetConfig``, or None if absent."""
    if importlib.util.find_spec("torchscale") is None:
        return None
    _stub_missing("fairscale.nn", checkpoint_wrapper=lambda m, **kw: m, wrap=lambda m, **kw: m)
    _stub_missing("timm.models.layers", drop_path=lambda x, *a, **kw: x)
    from torchscale.architecture.config import RetNetConfig
    from torchscale.architecture.retnet import RetNetRelPos
    from torchscale.component.multiscale_retention import MultiScaleRetention as TSRetention

    return types.SimpleNamespace(MultiScaleRetention=TSRetention, RetNetRelPos=RetNetRelPos, RetNetConfig=RetNetConfig)


def build_pair(
    ts: types.SimpleNamespace,
    *,
    d_model: int = 512,
    value_dim: int = 1024,
    num_heads: int = 8,
    chunk_size: int = 128,
    eps: float = 1e-6,
    seed: int = 0,
) -> tuple[torch.nn.Module, torch.nn.Module, MultiScaleRetention]:
    """``(torchscale_msr, torchscale_relpos, ours)`` computing the same function with the same weights.

    Ours is configured the way torchscale computes: its angle schedule (``linspace``), interleaved
    rotation, per-head RMSNorm without affine weights and the same epsilon.
    """
    torch.manual_seed(seed)
    args = ts.RetNetConfig(
        decoder_embed_dim=d_model,
        decoder_value_embed_dim=value_dim,
        decoder_retention_heads=num_heads,
        recurrent_chunk_size=chunk_size,
        layernorm_eps=eps,
    )
    theirs = ts.MultiScaleRetention(args, d_model, value_dim, num_heads)
    relpos = ts.RetNetRelPos(args)
    ours = mixers.build(
        "retention",
        d_model,
        num_heads=num_heads,
        value_dim=value_dim,
        rope_layout="interleaved",
        rope_schedule="linspace",
        norm="rmsnorm",
        norm_affine=False,
        norm_eps=eps,
    )
    with torch.no_grad():
        ours.in_proj.weight.copy_(
            torch.cat([theirs.q_proj.weight, theirs.k_proj.weight, theirs.v_proj.weight, theirs.g_proj.weight])
        )
        ours.out_proj.weight.copy_(theirs.out_proj.weight)
    return theirs, relpos, ours


def run_torchscale(msr: torch.nn.Module, relpos: torch.nn.Module, x: torch.Tensor, mode: str) -> torch.Tensor:
    """torchscale's output in ``"parallel"`` or ``"chunkwise"`` mode (its chunk size must divide T)."""
    chunkwise = mode == "chunkwise"
    return msr(x, relpos(x.shape[1], chunkwise_recurrent=chunkwise), chunkwise_recurrent=chunkwise)
