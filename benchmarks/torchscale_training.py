"""Training curves of our RetNet and the official one (torchscale 0.3.0's ``RetNetDecoder``), side by side.

Not a test (tests/test_torchscale_training.py is): it trains both for a few hundred steps in float32 on
CPU, prints both losses every ``--every`` steps, writes JSON (default
``benchmarks/results/torchscale_training.json``) and a plot beside it (``.png``).

Both models are built by ``tests.torchscale_compat.build_lm_pair``: torchscale's decoder with its own
init, and ours with a copy of every weight; the configs (``lm_configs``) describe one architecture, with
a negligible epsilon (1e-30) in the per-head norm inside retention, where the two normalise differently.
They see the same batches of the embedded corpus (seeded) and take the same steps of ``models.training.loop``'s
recipe (AdamW with weight decay 0.1 on matrices, lr 3e-3 with 20 warm-up steps and cosine decay, gradient
clipping at 1.0).

Training amplifies float32 rounding: two runs of the same function with differently rounded arithmetic
separate after a while. To say how far apart rounding alone takes two curves, a control trains our
model a second time from the same weights in the other mode (chunkwise if ``--mode parallel``, else
parallel): the same function (the modes agree to rounding), rounded differently. The claim is that
ours and torchscale's stay as close as our model and its control do. Expected (measured at the defaults,
see the JSON): for the first few dozen steps the losses are equal or one float32 ulp apart (~1e-7), then
both distances grow alike, after step ~50, to ~1e-3 per step (max ~7e-3), with no trend: the signed
differences average a few 1e-4 or less against a spread of ~2e-3; the final weights drift apart alike too
(the largest relative difference, in whichever tensor, is of the order 0.1 for both pairs). A real
difference in what is computed would instead show from the first steps and keep the curves apart in one
direction.

Usage: ``python benchmarks/torchscale_training.py [--steps 300] [--threads 1] [--mode parallel]``.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.common import run_info, write_json  # noqa: E402
from tests.torchscale_compat import (  # noqa: E402
    TrainConfig,
    build_lm_pair,
    import_torchscale,
    lm_configs,
    max_weight_difference,
    torchscale_logits,
    train_together,
)


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(a)


def summarize(reference: list[float], other: list[float], tail: int) -> dict[str, float]:
    """Distances between two loss curves: per step (max, final, median), their signed mean and spread
    (a systematic difference would show as a mean away from zero), and of the tail's mean loss."""
    signed = [(b - a) / abs(a) for a, b in zip(reference, other, strict=True)]
    diffs = sorted(abs(d) for d in signed)
    spread = statistics.pstdev(signed)
    return {
        "max_rel": max(diffs),
        "final_rel": rel(reference[-1], other[-1]),
        "median_rel": diffs[len(diffs) // 2],
        "mean_signed_rel": statistics.fmean(signed),
        "sd_signed_rel": spread,
        f"mean_loss_last_{tail}_rel": rel(statistics.fmean(reference[-tail:]), statistics.fmean(other[-tail:])),
        "first_step_rel": rel(reference[0], other[0]),
    }


def max_state_difference(reference: torch.nn.Module, other: torch.nn.Module) -> float:
    """The largest relative (Frobenius) difference over the tensors of two models of one architecture."""
    theirs = other.state_dict()
    return max(((theirs[k] - v).norm() / v.norm()).item() for k, v in reference.state_dict().items())


def plot(steps: list[int], curves: dict[str, list[float]], control_label: str, title: str, path: Path) -> None:
    """Top: the three loss curves; bottom: each curve's relative distance from torchscale's / ours (log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True, height_ratios=[3, 2])
    top.plot(steps, curves["torchscale"], color="C0", lw=1.6, label="torchscale RetNetDecoder")
    top.plot(steps, curves["ours"], color="C1", lw=1.0, ls="--", label="seqmixers LanguageModel")
    top.plot(steps, curves["control"], color="C2", lw=0.8, alpha=0.7, label=control_label)
    top.set_ylabel("training loss (nats/byte)")
    top.set_title(title)
    top.grid(alpha=0.3)
    top.legend()
    floor = 1e-9  # zero differences (bitwise equal losses) drawn at the floor of the log axis
    ours_vs_ts = [max(rel(a, b), floor) for a, b in zip(curves["torchscale"], curves["ours"], strict=True)]
    ctl_vs_ours = [max(rel(a, b), floor) for a, b in zip(curves["ours"], curves["control"], strict=True)]
    bottom.semilogy(steps, ours_vs_ts, color="C1", lw=0.9, label="|ours - torchscale| / torchscale")
    bottom.semilogy(steps, ctl_vs_ours, color="C2", lw=0.9, alpha=0.7, label="|control - ours| / ours (rounding)")
    bottom.set_xlabel("training step")
    bottom.set_ylabel("relative loss difference")
    bottom.grid(alpha=0.3, which="both")
    bottom.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--chunk-size", type=int, default=32, help="torchscale's recurrent_chunk_size and ours")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--mode", choices=["parallel", "chunkwise"], default="parallel")
    parser.add_argument("--every", type=int, default=25, help="print a row every this many steps")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "torchscale_training.json")
    args = parser.parse_args()
    if args.seq_len % args.chunk_size:
        parser.error(f"--chunk-size {args.chunk_size} must divide --seq-len {args.seq_len} (torchscale would pad)")
    torch.set_num_threads(args.threads)
    ts = import_torchscale()
    if ts is None:
        sys.exit("torchscale is not installed: pip install --no-deps torchscale==0.3.0")

    shape = {
        "d_model": args.d_model,
        "value_dim": 2 * args.d_model,  # the paper's 2x value width
        "num_heads": args.heads,
        "ffn_dim": 2 * args.d_model,  # the GLU's hidden width = the value width, as in torchscale's LM presets
        "n_layers": args.layers,
        "chunk_size": args.chunk_size,
    }
    theirs, ours = build_lm_pair(ts, **shape, seed=args.seed)
    control = copy.deepcopy(ours)
    other = "chunkwise" if args.mode == "parallel" else "parallel"
    tc = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, seed=args.seed, mode=args.mode
    )
    ts_args, config = lm_configs(ts, **shape)
    runs = [
        (theirs, lambda x: torchscale_logits(theirs, x, args.mode)),
        (ours, lambda x: ours(x, mode=args.mode, chunk_size=args.chunk_size)[0]),
        (control, lambda x: control(x, mode=other, chunk_size=args.chunk_size)[0]),
    ]
    print(
        f"== torchscale RetNetDecoder vs ours: d_model={args.d_model} layers={args.layers} heads={args.heads} "
        f"({ours.num_parameters():,} parameters), B={args.batch_size} T={args.seq_len}, {args.mode} mode, "
        f"float32, {args.threads} thread(s); control: ours in {other} mode =="
    )
    print(f"{'step':>5} {'torchscale':>11} {'ours':>11} {'rel diff':>9} {'control':>11} {'ctl vs ours':>11}")
    curves: dict[str, list[float]] = {"torchscale": [], "ours": [], "control": []}
    started = time.time()
    for step, (a, b, c) in train_together(runs, tc):
        for key, value in zip(curves, (a, b, c), strict=True):
            curves[key].append(value)
        if not all(math.isfinite(v) for v in (a, b, c)):
            sys.exit(f"a loss is not finite at step {step}: {a}, {b}, {c}")
        if step == 1 or step % args.every == 0 or step == args.steps:
            print(f"{step:>5} {a:>11.6f} {b:>11.6f} {rel(a, b):>9.2e} {c:>11.6f} {rel(b, c):>11.2e}", flush=True)
    train_s = time.time() - started
    tail = min(50, args.steps)
    summary = {
        "ours_vs_torchscale": summarize(curves["torchscale"], curves["ours"], tail),
        "control_vs_ours": summarize(curves["ours"], curves["control"], tail),
        "final_weights_max_rel": max_weight_difference(theirs, ours),
        "control_final_weights_max_rel": max_state_difference(ours, control),
    }
    print(f"\n== summary over {args.steps} steps (relative loss differences) ==")
    for name, row in summary.items():
        if isinstance(row, dict):
            print(f"  {name:<20} " + "  ".join(f"{k} {v:.2e}" for k, v in row.items()))
        else:
            print(f"  {name:<20} {row:.2e}")
    print(f"  training time {train_s:.1f}s")

    steps = list(range(1, args.steps + 1))
    result = {
        **run_info(args.threads),
        "torchscale": {
            "version": importlib.metadata.version("torchscale"),
            "config": dict(vars(ts_args)),
        },
        "ours": {"config": config.to_dict(), "parameters": ours.num_parameters()},
        "train": {**tc.to_dict(), "dtype": "float32", "control_mode": other},
        "summary": summary,
        "losses": curves,
        "train_s": round(train_s, 1),
    }
    write_json(args.out, result)
    png = args.out.with_suffix(".png")
    title = f"RetNet training, torchscale vs seqmixers: d={args.d_model}, {args.layers} layers, {args.mode}, float32"
    plot(steps, curves, f"control: ours in {other} mode", title, png)
    print(f"wrote {png.relative_to(ROOT) if png.is_relative_to(ROOT) else png}")


if __name__ == "__main__":
    main()
