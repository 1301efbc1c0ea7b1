"""Draw the paper benchmark's figures from its JSON alone, so they can be redrawn without rerunning::

    python -m benchmarks.paper.plot [--out benchmarks/results/paper]

Each ``PART.json`` found in ``--out`` gives ``PART.png``; every axis is labelled with its unit, and each figure's
title says the mode and the date of the run.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.paper.common import PARTS  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "results" / "paper"


def _title(result: dict[str, Any]) -> str:
    return (
        f"{result['title']}\n{result['budget']['name']} mode, {result['date'][:10]}, {result['machine']['processor']}"
    )


def _bars(ax: Any, labels: list[str], stats: list[dict[str, Any]], color: str, ylabel: str) -> None:
    """Mean over seeds with min-max whiskers, one bar per label."""
    means = [s["mean"] for s in stats]
    low = [s["mean"] - s["min"] for s in stats]
    high = [s["max"] - s["mean"] for s in stats]
    ax.bar(range(len(labels)), means, yerr=[low, high], color=color, capsize=3)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)


def ablations(result: dict[str, Any]) -> plt.Figure:
    corpora = list(dict.fromkeys(row["corpus"] for row in result["rows"]))
    fig, axes = plt.subplots(1, len(corpora), figsize=(6 * len(corpora), 4.5), squeeze=False)
    for ax, corpus in zip(axes[0], corpora, strict=True):
        rows = [row for row in result["rows"] if row["corpus"] == corpus]
        _bars(ax, [row["variant"] for row in rows], [row["val_ppl"] for row in rows], "tab:orange",
              "validation perplexity (per byte, mean; whiskers min-max)")  # fmt: skip
        ax.set_ylim(min(row["val_ppl"]["min"] for row in rows) * 0.95, None)
        ax.set_xlabel(f"variant ({Path(corpus).name})")
    fig.suptitle(_title(result), fontsize=9)
    return fig


def comparison(result: dict[str, Any]) -> plt.Figure:
    rows = result["rows"]
    corpora = list(rows[0]["val_ppl"])
    fig, axes = plt.subplots(1, len(corpora) + 1, figsize=(5 * (len(corpora) + 1), 4.5), squeeze=False)
    labels = [row["model"] for row in rows]
    for ax, corpus in zip(axes[0], corpora, strict=False):
        stats = [row["val_ppl"][corpus] for row in rows]
        _bars(ax, labels, stats, "tab:blue", "validation perplexity (per byte)")
        ax.set_ylim(min(s["min"] for s in stats) * 0.95, None)
        ax.set_xlabel(f"model ({Path(corpus).name})")
    ax = axes[0][-1]
    _bars(ax, labels, [row["mqar_accuracy"] for row in rows], "tab:green", "MQAR accuracy (fraction of queries)")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("model (MQAR)")
    fig.suptitle(_title(result), fontsize=9)
    return fig


def training_cost(result: dict[str, Any]) -> plt.Figure:
    fig, (speed, mem) = plt.subplots(1, 2, figsize=(10, 4))
    for name, model in result["models"].items():
        T = [r["T"] for r in model["rows"]]
        label = f"{name} ({model['mode']})"
        speed.plot(T, [r["tokens_per_s"] for r in model["rows"]], marker="o", label=label)
        mem.plot(T, [r["peak_bytes"] / 2**20 for r in model["rows"]], marker="o", label=label)
    for ax, ylabel in ((speed, "training tokens/s (one step, batch 1)"), (mem, "peak activation memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(_title(result), fontsize=9)
    return fig


def inference_cost(result: dict[str, Any]) -> plt.Figure:
    fig, (lat, memory, thr) = plt.subplots(1, 3, figsize=(15, 4))
    for i, (name, model) in enumerate(result["models"].items()):
        by_prefix = [r for r in model["rows"] if r["B"] == 1]
        by_batch = [r for r in model["rows"] if r["P"] == result["batch_prefix"]]
        for kind, style, marker in (("eager", "-", "o"), ("compiled", "--", "s")):
            pts = [r for r in by_prefix if f"{kind}_ms" in r]
            lat.plot([r["P"] for r in pts], [r[f"{kind}_ms"] for r in pts], style, marker=marker, color=f"C{i}",
                     label=f"{name} {kind}")  # fmt: skip
            pts = [r for r in by_batch if f"{kind}_ms" in r]
            thr.plot([r["B"] for r in pts], [r[f"{kind}_tokens_per_s"] for r in pts], style, marker=marker,
                     color=f"C{i}", label=f"{name} {kind}")  # fmt: skip
        memory.plot([r["P"] for r in by_prefix], [r["state_bytes"] / 2**10 for r in by_prefix], marker="o",
                    color=f"C{i}", label=f"{name} ({'KV cache' if name == 'transformer' else 'state'})")  # fmt: skip
    for ax, xlabel, ylabel in (
        (lat, "prefix length (tokens)", "decode latency (ms per step, batch 1)"),
        (memory, "prefix length (tokens)", "state / KV cache memory (KiB, batch 1)"),
        (thr, f"batch size (prefix {result['batch_prefix']} tokens)", "decode throughput (tokens/s)"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle(_title(result), fontsize=9)
    return fig


DRAW = {
    "ablations": ablations,
    "comparison": comparison,
    "training_cost": training_cost,
    "inference_cost": inference_cost,
}


def plot(out: Path, parts: Sequence[str] = PARTS) -> list[Path]:
    """``out/PART.png`` from ``out/PART.json`` for each of ``parts`` whose JSON exists; the PNGs written."""
    written = []
    for part in parts:
        source = out / f"{part}.json"
        if not source.exists():
            continue
        fig = DRAW[part](json.loads(source.read_text()))
        fig.tight_layout()
        fig.savefig(out / f"{part}.png", dpi=110)
        plt.close(fig)
        written.append(out / f"{part}.png")
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.paper.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the folder of the PART.json files")
    args = parser.parse_args(argv)
    written = plot(args.out)
    if not written:
        parser.error(f"no {', '.join(f'{p}.json' for p in PARTS)} in {args.out}")
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
