"""The optimizer of a run: AdamW with weight decay on matrices only, and its learning-rate schedule (linear
warm-up, then cosine decay)."""

from __future__ import annotations

import math

import torch

from models.config import TrainConfig


def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``min_lr_ratio * lr`` at the last step."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    progress = (step - tc.warmup_steps) / max(1, tc.steps - tc.warmup_steps)
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Optimizer parameter groups with weight decay on matrices only (not on norms, biases, or per-head
    scales), as is usual for transformers."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def make_optimizer(model: torch.nn.Module, tc: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (``decay_groups``)."""
    return torch.optim.AdamW(decay_groups(model, tc.weight_decay), lr=tc.lr, betas=(tc.beta1, tc.beta2))
