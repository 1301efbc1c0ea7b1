"""What the parts of the paper benchmark share: the budgets, one language-model training run, statistics over
seeds, running jobs (in worker processes, with the progress bar), and writing a part's JSON and Markdown table
with the machine, threads and date above the table."""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import write_json
from models import build_model
from models.config import ModelConfig, load_run_config, presets
from models.progress import Progress
from models.training.loop import train

PARTS = ("ablations", "comparison", "training_cost", "inference_cost")
EMBEDDED = "embedded corpus"
PAPER_SOURCE = "From the paper (Sun et al. 2023, arXiv 2307.08621), as PAPER.md quotes it; not measured here."


@dataclass(frozen=True)
class Budget:
    """How much every part runs. ``FULL`` is the published run, ``QUICK`` the five-minute one; a test may shrink
    either further with ``dataclasses.replace``."""

    name: str
    seeds: tuple[int, ...]
    # ablations and comparison: the demo presets' models (d_model 64, 4 layers) on byte-level text
    lm_steps: int
    lm_batch: int
    lm_seq_len: int
    lm_eval_batches: int
    # comparison: MQAR (8 pairs, 16 queries, length 32), 2 layers, d_model 64
    mqar_steps: int
    mqar_batch: int
    mqar_eval_size: int
    # training cost: same-size RetNet and Transformer (d_model, layers, heads), one step at each length
    cost_model: tuple[int, int, int]
    train_lengths: tuple[int, ...]
    cost_repeats: int
    # inference cost, the same models: latency and memory against the prefix at B = 1, throughput against B at
    # batch_prefix (one of prefixes, whose B = 1 row the prefix sweep measures)
    prefixes: tuple[int, ...]
    batches: tuple[int, ...]
    batch_prefix: int
    decode_steps: int
    decode_repeats: int
    compile_batches: tuple[int, ...]  # batch sizes whose decode step is also timed compiled

    def __post_init__(self) -> None:
        if not self.seeds:
            raise ValueError("a budget needs at least one seed, got none")
        if self.batch_prefix not in self.prefixes:
            raise ValueError(f"batch_prefix must be one of prefixes {self.prefixes}, got {self.batch_prefix}")


FULL = Budget(
    name="full", seeds=(0, 1, 2),
    lm_steps=300, lm_batch=16, lm_seq_len=128, lm_eval_batches=8,
    mqar_steps=600, mqar_batch=64, mqar_eval_size=1024,
    cost_model=(256, 4, 4), train_lengths=(512, 1024, 2048, 4096, 8192), cost_repeats=3,
    prefixes=(512, 1024, 2048, 4096, 8192, 16384), batches=(1, 2, 4, 8, 16, 32), batch_prefix=2048,
    decode_steps=10, decode_repeats=5, compile_batches=(1, 8, 32),
)  # fmt: skip
QUICK = Budget(
    name="quick", seeds=(0,),
    lm_steps=30, lm_batch=8, lm_seq_len=64, lm_eval_batches=2,
    mqar_steps=60, mqar_batch=32, mqar_eval_size=256,
    cost_model=(64, 2, 2), train_lengths=(128, 256, 512), cost_repeats=3,
    prefixes=(128, 512), batches=(1, 4), batch_prefix=128,
    decode_steps=5, decode_repeats=3, compile_batches=(1,),
)  # fmt: skip


def budget_notes(budget: Budget, learning: bool) -> list[str]:
    """What a reader must know about the budget before reading a number (``learning``: a part that trains)."""
    notes = []
    if budget.name != FULL.name and not learning:
        notes.append(f"{budget.name} mode: shorter lengths, smaller batches and fewer repeats than the full run.")
    if budget.name != FULL.name and learning:
        notes.append(
            f"{budget.name} mode: {budget.lm_steps} language-model and {budget.mqar_steps} MQAR steps instead of "
            f"{FULL.lm_steps} and {FULL.mqar_steps}; a smoke run of the pipeline, not evidence for any ordering."
        )
    if learning and len(budget.seeds) < len(FULL.seeds):
        spread = ": no spread is reported, and differences between rows may be seed noise alone"
        notes.append(
            f"{len(budget.seeds)} seed(s) instead of {len(FULL.seeds)}{spread if len(budget.seeds) < 2 else ''}."
        )
    return notes


def preset_model_config(name: str) -> dict[str, Any]:
    """A shipped preset's model config as a dict."""
    return load_run_config(presets()[name])[0].to_dict()


def num_parameters(config: dict[str, Any]) -> int:
    return build_model(ModelConfig.from_dict(config)).num_parameters()


def train_lm(config: dict[str, Any], budget: Budget, seed: int, text: str | None) -> dict[str, Any]:
    """Train ``config`` (a model config dict) on the embedded corpus or the text file ``text`` with the budget,
    on one thread, the demo presets' training settings otherwise (they share them); the final validation perplexity
    and curve."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    preset_train = load_run_config(presets()["retnet-tiny"])[1]
    train_config = dataclasses.replace(
        preset_train,
        steps=budget.lm_steps,
        batch_size=budget.lm_batch,
        seq_len=budget.lm_seq_len,
        eval_every=min(preset_train.eval_every, budget.lm_steps),
        eval_batches=budget.lm_eval_batches,
        warmup_steps=min(preset_train.warmup_steps, budget.lm_steps // 4),
        seed=seed,
        sample_tokens=0,
        data=text,
    )
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        result = train(ModelConfig.from_dict(config), train_config, out=out, progress=False)
    torch.set_num_threads(threads)  # an inline run (one worker) leaves the caller's threads as they were
    return {
        "val_ppl": result.val_ppl,
        "val_curve": result.val_curve,
        "tokens_per_s": result.tokens_per_s,
        "wall_s": time.perf_counter() - start,
    }


def stats(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (``None`` for one value), min, max and the values, over seeds."""
    values = [float(v) for v in values]
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "min": min(values),
        "max": max(values),
        "n": len(values),
        "values": values,
    }


def fmt_stats(s: dict[str, Any], digits: int = 2) -> str:
    """``mean ± std (min-max)``, or the value alone for one seed."""
    if s["n"] == 1:
        return f"{s['mean']:.{digits}f}"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


class Tracker:
    """The one progress bar over every job of every part (drawn on a terminal only), with a line per job."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.done, self.total = 0, total
        self.bar = Progress(total, "paper ", enabled=enabled, unit="job")

    def tick(self, text: str) -> None:
        self.done += 1
        self.bar.update(self.done, text)
        self.bar.log(f"[{self.done}/{self.total}] {text}")

    def close(self) -> None:
        self.bar.bar.close()


def run_jobs(
    fn: Callable[..., dict[str, Any]],
    jobs: Sequence[tuple],
    workers: int,
    tracker: Tracker,
    describe: Callable[[tuple, dict[str, Any]], str],
) -> list[dict[str, Any]]:
    """``fn(*job)`` for every job, ``workers`` processes at a time (one thread each; inline for 1), in job order."""
    results: list[dict[str, Any] | None] = [None] * len(jobs)
    if workers <= 1:
        for i, job in enumerate(jobs):
            results[i] = fn(*job)
            tracker.tick(describe(job, results[i]))
    else:
        with ProcessPoolExecutor(workers) as pool:
            futures = {pool.submit(fn, *job): i for i, job in enumerate(jobs)}
            for future in as_completed(futures):
                i = futures[future]
                results[i] = future.result()
                tracker.tick(describe(jobs[i], results[i]))
    return results  # type: ignore[return-value]


def header(info: dict[str, Any], budget: Budget, parallel: int = 1) -> str:
    """The line above every table: the machine, the threads, the date, the command and the budget."""
    m = info["machine"]
    runs = f" per run, {parallel} runs at a time" if parallel > 1 else ""
    return (
        f"Measured on {m['processor']} ({m['cpu_count']} CPUs, {m['platform']}), {m['threads']} torch thread(s)"
        f"{runs}; torch {m['torch']}, seqmixers {m['seqmixers']}; {info['date']}; {budget.name} mode, seeds "
        f"{list(budget.seeds)}; `{info['command']}`"
    )


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_part(
    out: Path,
    part: str,
    info: dict[str, Any],
    budget: Budget,
    *,
    title: str,
    tables: dict[str, str],
    notes: Sequence[str],
    data: dict[str, Any],
    learning: bool,
    paper_tables: dict[str, str] | None = None,
    parallel: int = 1,
) -> tuple[Path, Path]:
    """``out/PART.json`` (``info``, the budget, the notes, our tables with their header, the paper's, and
    ``data``) and ``out/PART.md`` (each of our tables under a heading with the header line above it, the paper's
    tables with their source, then the notes)."""
    line = header(info, budget, parallel)
    notes = [*budget_notes(budget, learning), *notes]
    paper_tables = paper_tables or {}
    result = {
        **info,
        "part": part,
        "title": title,
        "header": line,
        "budget": dataclasses.asdict(budget),
        "parallel_runs": parallel,
        "notes": notes,
        "tables": tables,
        "paper_tables": paper_tables,
        **data,
    }
    write_json(out / f"{part}.json", result)
    text = [f"## {title}", ""]
    for name, table in tables.items():
        text += [f"### {name}", "", line, "", table, ""]
    for name, table in paper_tables.items():
        text += [f"### {name}", "", PAPER_SOURCE, "", table, ""]
    text += [f"- {note}" for note in notes]
    md = out / f"{part}.md"
    md.write_text("\n".join(text) + "\n")
    return out / f"{part}.json", md
