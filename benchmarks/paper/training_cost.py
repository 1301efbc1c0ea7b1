"""Part 3, the paper's training-cost table against the sequence length: tokens/s and peak memory of one
training step (forward, cross-entropy, backward, AdamW step) at batch 1, for a RetNet trained chunkwise and a
Transformer trained with ``scaled_dot_product_attention``, the same size (``benchmarks.decode.configs``: the
RetNet's 2x value width is paid for with half the FFN width). Where do the curves cross?

Time: the least of the budget's repeats after a warm-up step (``benchmarks.common.timed``), wall clock: on a
shared machine the least keeps other processes' bursts out of the figure.
Memory: the peak of tensor storage during one step above its level before it, as torch's CPU allocator reports
it to the profiler (``benchmarks.chunkwise_memory.memory``); the weights, gradients and optimizer state made by
the warm-up step are not counted, the activations are.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.chunkwise_memory import memory
from benchmarks.common import run_info, timed
from benchmarks.decode import configs
from benchmarks.paper.common import Budget, Tracker, markdown_table, write_part
from models import build_model

MODELS = {"retnet": "chunkwise", "transformer": "parallel"}  # model -> the mode it trains in
MiB = 2**20
# PAPER.md, sequence 8192, 8 x A100: memory (GB) and throughput (words per second) per model size.
PAPER = {
    "1.3B": {"transformer_flash": (38.8, 63965), "retnet": (34.5, 73345)},
    "6.7B": {"transformer_flash": (51.4, 16230), "retnet": (48.0, 17459)},
}


def measure(model: torch.nn.Module, mode: str, T: int, repeats: int) -> dict[str, Any]:
    tokens = torch.randint(0, model.config.vocab_size, (1, T + 1), generator=torch.Generator().manual_seed(T))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        logits, _ = model(tokens[:, :-1], mode=mode)
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    seconds = timed(step, repeats, best=True)  # its warm-up step makes the optimizer state
    peak, _ = memory(step)
    return {"T": T, "step_s": seconds, "tokens_per_s": T / seconds, "peak_bytes": peak}


def crossing(rows: dict[str, list[dict[str, Any]]], key: str, retnet_better: Any) -> int | None:
    """The shortest length from which on the RetNet is better by ``key`` at every length measured
    (``retnet_better(retnet, transformer)``); ``None`` if it is not better at the longest."""
    found = None
    for r, t in reversed(list(zip(rows["retnet"], rows["transformer"], strict=True))):
        if not retnet_better(r[key], t[key]):
            break
        found = r["T"]
    return found


def run(out: Path, budget: Budget, threads: int, tracker: Tracker) -> tuple[Path, Path]:
    """Measure both models at every length; write ``training_cost.json`` and ``training_cost.md``."""
    start = time.perf_counter()
    torch.set_num_threads(threads)
    d_model, n_layers, heads = budget.cost_model
    model_configs = configs(d_model, n_layers, heads)
    rows: dict[str, list[dict[str, Any]]] = {}
    params = {}
    for name, mode in MODELS.items():
        torch.manual_seed(0)
        model = build_model(model_configs[name])
        params[name] = model.num_parameters()
        rows[name] = []
        for T in budget.train_lengths:
            row = measure(model, mode, T, budget.cost_repeats)
            rows[name].append(row)
            tracker.tick(
                f"training cost {name} T={T}: {row['tokens_per_s']:,.0f} tokens/s, {row['peak_bytes'] / MiB:.1f} MiB"
            )
    cross = {
        "tokens_per_s": crossing(rows, "tokens_per_s", lambda r, t: r > t),
        "peak_bytes": crossing(rows, "peak_bytes", lambda r, t: r < t),
    }
    lines = [
        [
            r["T"],
            f"{r['tokens_per_s']:,.0f}",
            f"{t['tokens_per_s']:,.0f}",
            f"{r['tokens_per_s'] / t['tokens_per_s']:.2f}x",
            f"{r['peak_bytes'] / MiB:,.1f}",
            f"{t['peak_bytes'] / MiB:,.1f}",
            f"{r['peak_bytes'] / t['peak_bytes']:.2f}x",
        ]
        for r, t in zip(rows["retnet"], rows["transformer"], strict=True)
    ]
    table = markdown_table(
        [
            "T",
            "RetNet tokens/s",
            "Transformer tokens/s",
            "RetNet / Transformer speed",
            "RetNet peak MiB",
            "Transformer peak MiB",
            "RetNet / Transformer memory",
        ],
        lines,
    )
    paper = markdown_table(
        ["size", "Transformer + FlashAttention", "RetNet", "RetNet / Transformer speed", "memory"],
        [
            [size, f"{p['transformer_flash'][0]} GB, {p['transformer_flash'][1]:,} wps",
             f"{p['retnet'][0]} GB, {p['retnet'][1]:,} wps",
             f"{p['retnet'][1] / p['transformer_flash'][1]:.2f}x", f"{p['retnet'][0] / p['transformer_flash'][0]:.2f}x"]
            for size, p in PAPER.items()
        ],
    )  # fmt: skip
    longest = budget.train_lengths[-1]
    said = {k: f"from T = {v} on" if v else f"not even at T = {longest}" for k, v in cross.items()}
    notes = [
        f"Models: d_model {d_model}, {n_layers} layers, {heads} heads, vocabulary 256, float32, batch 1; RetNet "
        f"{params['retnet']:,} parameters (chunkwise, the mixer's default chunk), Transformer "
        f"{params['transformer']:,} (SDPA, causal).",
        f"The RetNet's training step is faster than the Transformer's {said['tokens_per_s']}; it needs less peak "
        f"memory {said['peak_bytes']}.",
        "The paper's table is at T = 8192 on 8 A100s against FlashAttention, a fused kernel whose memory is linear "
        "in T, as PyTorch's fused CPU attention is here; its GPU throughput figures cannot be compared with CPU "
        "ones, only the direction of the ratios.",
    ]
    return write_part(
        out,
        "training_cost",
        run_info(threads),
        budget,
        title="Training cost against the sequence length (the paper's training-cost table)",
        tables={"One training step, batch 1": table},
        paper_tables={"The paper: sequence 8192, 8 x A100": paper},
        learning=False,
        notes=notes,
        data={
            "models": {name: {"params": params[name], "mode": MODELS[name], "rows": rows[name]} for name in MODELS},
            "config": {"d_model": d_model, "n_layers": n_layers, "heads": heads, "batch": 1, "dtype": "float32"},
            "crossing": cross,
            "paper": PAPER,
            "wall_s": time.perf_counter() - start,
        },
    )
