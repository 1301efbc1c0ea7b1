"""Where a non-finite loss came from, for the message of a diverged run: a weight an update made non-finite, or
the first layer (and the backend its mixer runs on) whose output is not finite although its inputs were."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from mixers.registry import get_registry
from models.config import ModelConfig, TrainConfig
from models.training.parallel import Layout, unwrapped


def nonfinite_origin(
    model: nn.Module, config: ModelConfig, tc: TrainConfig, batches: list[tuple], layout: Layout, *, sharded: bool
) -> str:
    """The first parameter of ``model`` that is not finite, or else the first layer whose output is not finite on
    ``batches`` (``(x, y)`` or ``(x, y, cu_seqlens or None, ...)``), run as they were: under the run's autocast,
    and under context parallelism if they are ``sharded`` over the ranks' time (a training step's, not
    validation's). Every rank runs the same forward passes (FSDP and context parallelism need them all)."""
    plain, device = unwrapped(model), layout.world.device
    for name, param in plain.named_parameters():
        if not bool(torch.isfinite(param).all()):
            return f"the weight {name} is not finite (an update made it so); lower lr (now {tc.lr})"
    found: list[str] = []

    def watch(label: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            y = output[0] if isinstance(output, tuple) else output
            if not found and isinstance(y, torch.Tensor) and not bool(torch.isfinite(y).all()):
                found.append(label)

        return hook

    handles = [plain.tok_emb.register_forward_hook(watch("the embedding"))]
    for i, block in enumerate(plain.blocks):
        mixer = f"layer {i}'s mixer {_mixer_name(plain, config, tc, i, device)}"
        handles.append(block.mixer.register_forward_hook(watch(mixer)))
        handles.append(block.ffn.register_forward_hook(watch(f"layer {i}'s FFN")))
    cp = layout.context(model) if sharded else contextlib.nullcontext()
    try:
        with torch.no_grad(), layout.autocast(tc.precision), cp:
            for x, _, *packed in batches:
                cu_seqlens = packed[0].to(device) if packed and packed[0] is not None else None
                model(x.to(device), mode=tc.mode, chunk_size=tc.chunk_size, cu_seqlens=cu_seqlens)
    finally:
        for handle in handles:
            handle.remove()
    if found:
        return f"the first non-finite output is {found[0]}, whose inputs were finite"
    return f"every layer's output is finite: the loss or the backward pass is not; lower lr (now {tc.lr})"


def _mixer_name(model: nn.Module, config: ModelConfig, tc: TrainConfig, layer: int, device: torch.device) -> str:
    """``'retention' (backend 'torch' of plugin ...)``: the mixer of ``layer`` and the backends it runs on."""
    mixer = model.blocks[layer].mixer
    spec = config.layer_specs()[layer].mixer
    registry, dtype = get_registry(), torch.bfloat16 if tc.precision == "bf16" else torch.float32
    backends = []
    for op in getattr(mixer, "ops", ()):
        try:
            chosen = registry.resolve_backend(op, mixer.backend, device=device, dtype=dtype, mode=tc.mode)
            backends.append(registry.describe_backend(chosen))
        except (KeyError, ValueError, RuntimeError):
            backends.append(f"backend {mixer.backend!r} of op {op!r}")
    return f"{spec!r} ({'; '.join(backends) or 'no registered op'})"
