"""The run log: one JSON object per logged training step in a JSONL file, and a PNG of its curves.

``RunLog(path, every, enabled)`` appends a line every ``every`` steps (step, loss, lr, tokens/s, grad norm,
memory, seconds since the log was opened), flushed as it is written, so the file can be followed while training
runs; only where ``enabled`` (rank 0 of a distributed run): elsewhere it writes nothing and creates no file.
``plot_curves`` draws the loss, learning rate, tokens/s and gradient norm against the step into a PNG (2x2).
See docs/training-data.md.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

LOG_FIELDS = ("step", "loss", "lr", "tokens_per_s", "grad_norm", "memory", "elapsed_s")
CURVES = (("loss", "loss"), ("lr", "learning rate"), ("tokens_per_s", "tokens/s"), ("grad_norm", "gradient norm"))


def _number(value: Any) -> float | int | None:
    """A plain JSON number (tensors become Python numbers); ``None`` for NaN and infinities (not valid JSON)."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value
    value = float(value)
    return value if math.isfinite(value) else None


def memory_stats(device: torch.device | str | None = None) -> dict[str, float]:
    """Memory in MiB: ``process_peak_rss_mib``, the most resident memory this process has had so far
    (``resource.getrusage``; absent where there is no ``resource`` module, as on Windows), and on a CUDA device
    ``cuda_max_allocated_mib`` (``torch.cuda.max_memory_allocated``: the peak of tensors allocated on it)."""
    stats: dict[str, float] = {}
    try:
        import resource
    except ImportError:  # pragma: no cover  (Windows)
        resource = None
    if resource is not None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        stats["process_peak_rss_mib"] = round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        stats["cuda_max_allocated_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return stats


class RunLog:
    """Appends one JSON object per logged step to ``path`` (JSONL), every ``every`` steps, where ``enabled``.

    ``log(step, loss=..., lr=..., tokens_per_s=..., grad_norm=...)`` writes, when ``due(step)`` (``step`` a
    multiple of ``every``, or ``force=True``), ``{"step", "loss", "lr", "tokens_per_s", "grad_norm", "memory",
    "elapsed_s"}`` and the extra keyword fields that are not ``None`` (e.g. ``val_loss``), and returns the record
    (``None`` when nothing was written). Numbers that are NaN or infinite are written as ``null``. ``memory`` is
    ``memory_stats(device)``. The file is opened on the first line written, in append mode (a resumed run adds
    to it; ``plot_curves`` keeps the last record of each step), and each line is flushed.
    """

    def __init__(
        self,
        path: str | Path,
        every: int = 1,
        enabled: bool = True,
        *,
        device: torch.device | str | None = None,
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        self.path = Path(path)
        self.every = every
        self.enabled = enabled
        self.device = device
        self._file = None
        self._t0 = time.perf_counter()

    def due(self, step: int) -> bool:
        return self.enabled and step % self.every == 0

    def log(
        self,
        step: int,
        *,
        loss: Any = None,
        lr: Any = None,
        tokens_per_s: Any = None,
        grad_norm: Any = None,
        force: bool = False,
        **extra: Any,
    ) -> dict | None:
        if not self.enabled or not (force or self.due(step)):
            return None
        record = {
            "step": int(step),
            "loss": _number(loss),
            "lr": _number(lr),
            "tokens_per_s": _number(tokens_per_s),
            "grad_norm": _number(grad_norm),
            "memory": memory_stats(self.device),
            "elapsed_s": round(time.perf_counter() - self._t0, 3),
        }
        for key, value in extra.items():
            if value is None:
                continue
            record[key] = value if isinstance(value, (str, dict, list)) else _number(value)
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")  # closed in close()
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        return record

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_log(path: str | Path) -> list[dict]:
    """The records of a run log, in step order, the last one of each step (a resumed run logs steps again)."""
    by_step: dict[int, dict] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


def plot_curves(jsonl_path: str | Path, png_path: str | Path, *, title: str | None = None) -> Path | None:
    """Draw the run log's loss (and ``val_loss`` where logged), learning rate, tokens/s and gradient norm
    against the step, 2x2, into ``png_path`` (written atomically). Returns the path, or ``None`` with a printed
    note when matplotlib is not installed or the log has no records."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"note: matplotlib is not installed, so no plot of {jsonl_path} (pip install matplotlib)")
        return None
    records = read_log(jsonl_path)
    if not records:
        print(f"note: the run log {jsonl_path} is empty: no plot")
        return None
    png_path = Path(png_path)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    for ax, (key, label) in zip(axes.flat, CURVES, strict=True):
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points, strict=True), label="train" if key == "loss" else None)
        if key == "loss":
            val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
            if val:
                ax.plot(*zip(*val, strict=True), "o--", label="validation")
                ax.legend()
        if key == "grad_norm" and points and min(v for _, v in points) > 0:
            ax.set_yscale("log")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("step")
    fig.suptitle(title or str(jsonl_path))
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = png_path.with_name(f".{png_path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, png_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return png_path
