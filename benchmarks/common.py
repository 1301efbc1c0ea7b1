"""What every benchmark script records beside its numbers: the command, date and machine; atomic JSON."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import mixers

ROOT = Path(__file__).resolve().parents[1]


def run_info(threads: int) -> dict:
    """The command line, the UTC date and the machine a result was measured on."""
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "threads": threads,
            "torch": torch.__version__,
            "seqmixers": mixers.__version__,
        },
    }


def write_json(path: Path, result: dict) -> None:
    """Write ``result`` to ``path`` atomically (a reader never sees half a file) and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(path)
    print(f"\nwrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


def timed(fn: Callable[[], object], repeats: int, *, best: bool = False, warmup: bool = True) -> float:
    """Median (or, with ``best``, minimum) wall time of ``fn`` over ``repeats`` runs, after an untimed run
    (``warmup``).

    The minimum suits microsecond-scale steps, whose median on a shared machine mostly measures
    other processes; the median suits the long runs.
    """
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) if best else statistics.median(times)
