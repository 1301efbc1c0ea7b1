"""What validation measures: the mean next-token cross-entropy over a run's fixed validation batches, and its
perplexity."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from models.config import TrainConfig
from models.training.data import IGNORE
from models.training.parallel import unwrapped


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[tuple[torch.Tensor, ...]], tc: TrainConfig) -> float:
    """Mean next-token cross-entropy (nats) over ``batches``: each ``(x [B, T], y [B, T])``, or packed,
    ``(x [1, T], y [1, T], cu_seqlens)`` with ``y = -100`` where nothing is counted (the sum of the losses
    over the count of counted targets)."""
    was_training, device = model.training, unwrapped(model).device
    model.eval()
    total, count = 0.0, 0
    for x, y, *packed in batches:
        x, y = x.to(device), y.to(device)
        cu_seqlens = packed[0].to(device) if packed else None
        logits, _ = model(x, mode=tc.mode, chunk_size=tc.chunk_size, cu_seqlens=cu_seqlens)  # (B, T, V)
        total += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE, reduction="sum").item()
        count += int((y != IGNORE).sum())
    model.train(was_training)
    return total / count


def perplexity(loss: float) -> float:
    """``exp(loss)``, infinite rather than an ``OverflowError`` for a diverged loss."""
    return math.inf if loss > 700 else math.exp(loss)
