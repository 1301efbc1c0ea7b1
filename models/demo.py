"""The main job (``seqmixers demo``): a tiny RetNet, a tiny Transformer and a tiny hybrid, trained with the same
budget on the embedded corpus, then compared.

It prints a table (validation perplexity, training tokens/s, decode ms/token at two prefix lengths,
recurrent-state bytes vs KV-cache bytes), a short sample from each model, and saves under ``out``:
``demo.png`` (loss curves; decode cost and state memory against prefix length), ``results.json`` (the
table and curves) and each model's checkpoint. A few minutes at most on a laptop CPU.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import mixers
from models.config import load_run_config, presets
from models.measure import decode_profile, split_state_bytes
from models.progress import Progress
from models.training.data import default_corpus
from models.training.loop import train
from models.training.tokenizers import ByteTokenizer

MODELS = ("retnet-tiny", "transformer-tiny", "hybrid-tiny")
LENGTHS = (128, 256, 512, 1024, 2048, 4096)
TABLE_LENGTHS = (512, 4096)


def _atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _kib(n: int) -> str:
    return f"{n / 1024:,.0f}"


def format_table(rows: list[dict], lengths: tuple[int, int]) -> str:
    a, b = lengths
    head = (
        f"{'model':<17} {'params':>8} {'val ppl':>8} {'train tok/s':>12} "
        f"{f'decode ms @{a}':>15} {f'@{b}':>7} {f'state KiB @{a}':>15} {f'@{b}':>6} "
        f"{f'KV cache KiB @{a}':>18} {f'@{b}':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        d = {row["T"]: row for row in r["decode"]}
        s = {row["T"]: row for row in r["state_split"]}
        lines.append(
            f"{r['name']:<17} {r['params']:>8,} {r['val_ppl']:>8.2f} {r['tokens_per_s']:>12,.0f} "
            f"{d[a]['decode_ms']:>15.2f} {d[b]['decode_ms']:>7.2f} "
            f"{_kib(s[a]['fixed_bytes']):>15} {_kib(s[b]['fixed_bytes']):>6} "
            f"{_kib(s[a]['growing_bytes']):>18} {_kib(s[b]['growing_bytes']):>7}"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Loss curves, decode ms/token and state memory against prefix length, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_ms, ax_mem) = plt.subplots(1, 3, figsize=(16, 4.6))
    for r in rows:
        steps, losses = zip(*r["train_curve"], strict=True)
        window = max(1, len(losses) // 30)  # a running mean, so the curves can be told apart
        smooth = [
            sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
            for i in range(len(losses))
        ]
        (line,) = ax_loss.plot(steps, smooth, label=f"{r['name']} train", alpha=0.8)
        vs, vl = zip(*r["val_curve"], strict=True)
        ax_loss.plot(vs, vl, "o--", color=line.get_color(), label=f"{r['name']} val")
        T = [row["T"] for row in r["decode"]]
        ax_ms.plot(T, [row["decode_ms"] for row in r["decode"]], "o-", label=r["name"])
        ax_mem.plot(T, [row["state_bytes"] / 1024 for row in r["decode"]], "o-", label=r["name"])
    ax_loss.set(xlabel="step", ylabel="loss (nats/byte)", title="training (running mean) and validation loss")
    ax_loss.set_ylim(top=min(4.0, ax_loss.get_ylim()[1]))
    ax_ms.set(xlabel="prefix length (tokens)", ylabel="ms / token", title="decode cost vs prefix length")
    ax_mem.set(xlabel="prefix length (tokens)", ylabel="KiB", title="state memory (states + KV caches)")
    for ax in (ax_ms, ax_mem):
        ax.set_xscale("log", base=2)
        ax.set_ylim(bottom=0)
    for ax in (ax_loss, ax_ms, ax_mem):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    _atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def run(
    out: str | Path = "runs/demo",
    *,
    names: tuple[str, ...] = MODELS,
    steps: int | None = None,
    lengths: tuple[int, ...] = LENGTHS,
    table_lengths: tuple[int, int] = TABLE_LENGTHS,
    decode_steps: int = 10,
    decode_repeats: int = 5,
    data: bytes | None = None,
    progress: bool = True,
) -> list[dict]:
    """Train each preset in ``names`` with the same budget, profile its decoding, print the table and
    save the plot, the JSON and the checkpoints under ``out``; returns the table rows.

    ``steps``: training steps per model (``None``: each preset's). ``progress``: progress bars on stderr
    (drawn on a terminal only) for the training and the decode profiling."""
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be an int >= 1 or None (the presets' steps), got {steps!r}")
    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = default_corpus() if data is None else data
    lengths = tuple(sorted(set(lengths) | set(table_lengths)))
    threads = torch.get_num_threads()
    source = "pydoc help text (embedded corpus)" if data is None else "text"
    print(
        f"seqmixers demo: {len(names)} models, same budget, on {len(text) / 1024:,.0f} KiB of "
        f"{source}; {threads} thread{'s' if threads > 1 else ''}",
        flush=True,
    )
    rows, tokens = [], ByteTokenizer()
    for name in names:
        model_config, train_config = load_run_config(presets()[name])
        budget = train_config.steps if steps is None else steps
        train_config = dataclasses.replace(
            train_config,
            steps=budget,
            sample_tokens=0,
            eval_every=min(train_config.eval_every, budget),
        )
        print(f"\n== {name}: {model_config.describe()}", flush=True)
        result = train(model_config, train_config, data=text, out=out / name, progress=progress, label=f"{name} ")
        model = result.model
        # the validation text as the prefix, repeated if it is shorter than the longest length
        val = torch.tensor(list(text[len(text) - int(len(text) * train_config.val_fraction) :]))  # held out (bytes)
        prefix = val.repeat(math.ceil(max(lengths) / len(val)))[None, : max(lengths)]  # (1, L)
        with Progress(len(lengths), f"{name} decode profile ", enabled=progress, unit="length") as bar:
            profile = decode_profile(
                model,
                prefix,
                lengths,
                steps=decode_steps,
                repeats=decode_repeats,
                on_length=lambda row, bar=bar: bar.update(lengths.index(row["T"]) + 1, f"T={row['T']}"),
            )
        prompt = torch.tensor(tokens.encode("The "), dtype=torch.long)
        sample = tokens.decode(model.generate(prompt, 100, temperature=0.8, seed=0))
        print(f"   sample: {sample!r}", flush=True)
        rows.append(
            {
                "name": name,
                "params": model.num_parameters(),
                "val_loss": result.val_loss,
                "val_ppl": result.val_ppl,
                "tokens_per_s": result.tokens_per_s,
                "train_s": result.train_s,
                "decode": profile,
                "state_split": split_state_bytes(profile),
                "train_curve": result.train_curve,
                "val_curve": result.val_curve,
                "sample": sample,
                "checkpoint": str(result.checkpoint),
                "config": model_config.to_dict(),
                "train_config": train_config.to_dict(),
            }
        )
    table = format_table(rows, table_lengths)
    wall = time.perf_counter() - started
    print(f"\n== results (val ppl per byte; decode is B=1, one token, after a prefix of T tokens) ==\n{table}")
    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "seqmixers": mixers.__version__,
        },
        "table_lengths": list(table_lengths),
        "table": table,
        "models": rows,
        "wall_s": wall,
    }
    _atomic_write(out / "results.json", lambda tmp: tmp.write_text(json.dumps(results, indent=1)))
    plot(rows, out / "demo.png")
    print(f"\nsaved {out / 'demo.png'}, {out / 'results.json'} and checkpoints {out}/<model>/model.safetensors")
    print(f"demo wall time {wall:.0f} s")
    return rows
