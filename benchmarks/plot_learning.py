"""Draw MQAR accuracy against steps for each mixer, with and without the short convolution on q, k, v
(docs/images/learning_conv.png), from ``benchmarks/results/learning_defaults.json`` (the ``new`` defaults)
and ``benchmarks/results/learning_conv.json``::

    python benchmarks/plot_learning.py
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def main() -> int:
    base = json.loads((RESULTS / "learning_defaults.json").read_text())["runs"]
    conv = json.loads((RESULTS / "learning_conv.json").read_text())["models"]
    seeds = range(3)
    series = [
        ("softmax attention", "tab:blue", "-", [base[f"mqar/softmax_attention/new/{s}"] for s in seeds]),
        ("retention", "tab:orange", ":", [base[f"mqar/retention/new/{s}"] for s in seeds]),
        ("retention, conv_size=4", "tab:orange", "-", [conv["retention+conv4"]["runs"][str(s)] for s in seeds]),
        ("linear attention", "tab:green", ":", [base[f"mqar/linear_attention/new/{s}"] for s in seeds]),
        (
            "linear attention, conv_size=4",
            "tab:green",
            "-",
            [conv["linear_attention+conv4"]["runs"][str(s)] for s in seeds],
        ),
    ]
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, color, style, runs in series:
        for i, run in enumerate(runs):
            ax.plot(run["steps"], run["accuracy"], color=color, linestyle=style, alpha=0.8, label=None if i else label)
    ax.set_xlabel("training step")
    ax.set_ylabel("MQAR query accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title("MQAR (8 pairs, length 32), 2 layers, d_model 64: seeds 0-2, current defaults")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = ROOT / "docs" / "images" / "learning_conv.png"
    fig.savefig(out, dpi=110)
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
