"""Decode cost against prefix length: per-token latency and state memory of a language model.

Shared by the demo and ``benchmarks/decode.py``. The prefix is prefilled in chunkwise mode, extended
from one length to the next by handing the states over, and at each length the same one-token
recurrent step is timed repeatedly from the same states (so the prefix length stays fixed).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from mixers import MixerState
from mixers.structure import tensors_in
from models.lm import LanguageModel


@torch.no_grad()
def decode_profile(
    model: LanguageModel,
    tokens: Tensor,
    lengths: Sequence[int],
    *,
    steps: int = 10,
    repeats: int = 3,
    chunk_size: int | None = None,
    on_length: Callable[[dict], None] | None = None,
) -> list[dict]:
    """For each prefix length T: median ms per decoded token and the state bytes per layer.

    Arguments:
        tokens: ``[B, L]`` token ids, ``L >= max(lengths)``; the prefix is ``tokens[:, :T]``.
        steps, repeats: ``repeats`` blocks of ``steps`` timed decode steps per length (after one warm-up
            step); the least of the blocks' medians is reported, which keeps a burst of load from other
            processes on a shared machine out of the figure.
        on_length: called with each length's row as soon as it is measured (a progress bar).

    Returns:
        One dict per length: ``T``, ``decode_ms``, ``state_bytes`` (all layers) and
        ``layer_bytes`` (per layer).
    """
    lengths = sorted(lengths)
    if tokens.dim() != 2 or tokens.shape[1] < lengths[-1]:
        raise ValueError(f"tokens must be [B, L] with L >= {lengths[-1]}, got shape {list(tokens.shape)}")
    was_training = model.training
    model.eval()
    tokens = tokens.to(model.device)
    token = tokens[:, :1]
    rows, states, pos = [], None, 0
    for T in lengths:
        _, states = model(tokens[:, pos:T], states, mode="chunkwise", chunk_size=chunk_size)
        pos = T
        model(token, states, mode="recurrent")  # warm-up
        medians = []
        for _ in range(repeats):
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                model(token, states, mode="recurrent")
                times.append(time.perf_counter() - t0)
            medians.append(statistics.median(times))
        layer_bytes = [held_nbytes(s) for s in states]
        rows.append(
            {
                "T": T,
                "decode_ms": min(medians) * 1e3,
                "state_bytes": sum(layer_bytes),
                "layer_bytes": layer_bytes,
            }
        )
        if on_length is not None:
            on_length(rows[-1])
    model.train(was_training)
    return rows


def held_nbytes(state: MixerState) -> int:
    """Bytes of what a state holds about the sequence: its floating-point tensors, a KV cache counted by its
    tokens, not the free slots it keeps for later ones (a cache grows by doubling, so its allocation would
    overstate the tokens' bytes by up to 2x); positions and lengths (8 bytes a row) are bookkeeping, left out."""
    if hasattr(state.op, "held"):  # a KV cache (or a plugin's state that keeps free slots too)
        state = dataclasses.replace(state, op=state.op.held())
    fields = [getattr(state, f.name) for f in dataclasses.fields(state)]
    return sum(t.numel() * t.element_size() for t in tensors_in(tuple(fields)) if t.is_floating_point())


def split_state_bytes(profile: list[dict]) -> list[dict]:
    """Per length: bytes of fixed-size states vs growing ones (KV caches), told apart by growth over the profile."""
    first, last = profile[0]["layer_bytes"], profile[-1]["layer_bytes"]
    growing = [b1 > b0 for b0, b1 in zip(first, last, strict=True)]
    return [
        {
            "T": row["T"],
            "fixed_bytes": sum(b for b, g in zip(row["layer_bytes"], growing, strict=True) if not g),
            "growing_bytes": sum(b for b, g in zip(row["layer_bytes"], growing, strict=True) if g),
        }
        for row in profile
    ]
