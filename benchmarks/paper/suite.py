"""The paper benchmark's command line and its function API (``run``), which the smoke test calls with a smaller
budget. ``python -m benchmarks.paper --help`` lists the options."""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks.paper import ablations, comparison, inference_cost, plot, training_cost
from benchmarks.paper.common import FULL, PARTS, QUICK, Budget, Tracker
from benchmarks.paper.inference_cost import rows_of

DEFAULT_OUT = plot.DEFAULT_OUT


def job_count(budget: Budget, parts: Sequence[str], corpora: int) -> int:
    """Jobs the progress bar counts: training runs, lengths measured and decode rows."""
    seeds = len(budget.seeds)
    counts = {
        "ablations": corpora * len(ablations.VARIANTS) * seeds,
        "comparison": (corpora + 1) * len(comparison.MODELS) * seeds,
        "training_cost": len(training_cost.MODELS) * len(budget.train_lengths),
        "inference_cost": 2 * len(rows_of(budget)),
    }
    return sum(counts[part] for part in parts)


def run(
    out: Path,
    budget: Budget = QUICK,
    *,
    parts: Sequence[str] = PARTS,
    text: Path | None = None,
    workers: int = 2,
    threads: int = 1,
    progress: bool = True,
) -> dict[str, list[Path]]:
    """Run ``parts`` with ``budget`` into ``out``: per part its JSON, Markdown and PNG, plus ``out/summary.md`` (every
    part's table found in ``out``). ``text``: a text file the language models also train on, beside the embedded
    corpus. ``workers``: training runs in parallel (one thread each); ``threads``: torch threads of the cost parts (one
    by default: on a shared, loaded machine a second thread makes these small steps wait for a core, and the
    timings erratic)."""
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise ValueError(f"parts must be a non-empty selection of {list(PARTS)}, got {list(parts)}")
    if text is not None and not Path(text).is_file():
        raise FileNotFoundError(f"--text must be a text file, got {str(text)!r} (no such file)")
    corpora: list[str | None] = [None] if text is None else [None, str(Path(text).resolve())]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tracker = Tracker(job_count(budget, parts, len(corpora)), enabled=progress)
    written: dict[str, list[Path]] = {}
    try:
        for part in parts:
            if part == "ablations":
                files = ablations.run(out, budget, corpora, workers, tracker)
            elif part == "comparison":
                files = comparison.run(out, budget, corpora, workers, tracker)
            elif part == "training_cost":
                files = training_cost.run(out, budget, threads, tracker)
            else:
                files = inference_cost.run(out, budget, threads, tracker)
            written[part] = [*files, *plot.plot(out, [part])]
    finally:
        tracker.close()
    summary = out / "summary.md"
    found = [out / f"{part}.md" for part in PARTS if (out / f"{part}.md").exists()]
    summary.write_text(
        "# The RetNet paper's tables in miniature\n\nWritten by `python -m benchmarks.paper`; see docs/paper.md.\n\n"
        + "\n".join(path.read_text() for path in found)
    )
    written["summary"] = [summary]
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.paper",
        description="The RetNet paper's ablations, mixer comparison, training and inference cost, in miniature; "
        "JSON, Markdown and PNG per part (docs/paper.md).",
    )
    parser.add_argument("--quick", action="store_true", help="the five-minute budget (1 seed): a smoke run")
    parser.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS), metavar="PART", help=str(PARTS))
    parser.add_argument("--text", type=Path, help="a text file to train the language models on too")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the budget's seeds")
    parser.add_argument("--workers", type=int, default=2, help="training runs in parallel, one thread each")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the cost parts")
    parser.add_argument("--out", type=Path, help=f"default {DEFAULT_OUT} ({DEFAULT_OUT}/quick with --quick)")
    args = parser.parse_args(argv)
    budget = QUICK if args.quick else FULL
    if args.seeds:
        budget = dataclasses.replace(budget, seeds=tuple(args.seeds))
    out = args.out or (DEFAULT_OUT / "quick" if args.quick else DEFAULT_OUT)
    start = time.perf_counter()
    torch.manual_seed(0)
    written = run(
        out,
        budget,
        parts=args.only,
        text=args.text,
        workers=args.workers,
        threads=args.threads,
    )
    print(f"\n{budget.name} run of {', '.join(args.only)} took {time.perf_counter() - start:.0f} s; wrote:")
    for paths in written.values():
        for path in paths:
            print(f"  {path}")
    return 0
