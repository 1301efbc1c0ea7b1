"""Synthetic tasks whose answer is known, to measure how well a model *learns* (not only what it computes).

- ``mqar``: multi-query associative recall (Zoology, Arora et al. 2023): ``num_pairs`` key-value pairs,
  then ``num_queries`` keys at random later positions; at each query the model must output its value.
- ``induction``: a trigger token, the token after it, noise, then the trigger again: output that token.
- ``selective_copy``: ``num_tokens`` data tokens scattered among noise, then as many markers: output the
  data tokens in order, one per marker (Mamba, Gu and Dao 2023).

Each task draws batches ``(inputs [B, T], targets [B, T])`` from a ``torch.Generator``; ``targets`` is
``IGNORE`` (-100) where nothing is asked, and accuracy counts only the asked positions.

Command line (any model config, several seeds; prints accuracy against steps, writes JSON and a PNG)::

    python -m benchmarks.synthetic --task mqar --config transformer-tiny --steps 600 --seeds 0 1 2
    python -m benchmarks.synthetic --task mqar --model '{"d_model": 64, "n_layers": 2, ...}'
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.progress import Progress
from models.training.optim import decay_groups

IGNORE = -100
TASKS = ("mqar", "induction", "selective_copy")


# -- tasks -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Task:
    """A synthetic task and its knobs; ``batch(B, generator)`` draws ``(inputs, targets)``.

    ``vocab_size`` counts every token id the task uses (the model's vocabulary must be at least this).
    ``seq_len`` is the length of each row. The other fields are the task's own (see ``TASK_FIELDS``).
    """

    name: str = "mqar"
    vocab_size: int = 65
    seq_len: int = 32
    num_pairs: int = 8  # mqar: key-value pairs in the context
    num_queries: int = 16  # mqar: queries after the context
    num_tokens: int = 8  # selective_copy: data tokens to copy
    query_power: float = 0.0  # mqar: query positions drawn with weight (j + 1) ** -query_power (0: uniform)

    def __post_init__(self) -> None:
        if self.name not in TASKS:
            raise ValueError(f"task must be one of {list(TASKS)}, got {self.name!r}")
        for name in ("vocab_size", "seq_len", "num_pairs", "num_queries", "num_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        power = self.query_power
        if isinstance(power, bool) or not isinstance(power, (int, float)) or not 0 <= power < float("inf"):
            raise ValueError(f"query_power must be a finite number >= 0, got {power!r}")
        if self.name == "mqar":
            keys = (self.vocab_size - 1) // 2
            if self.num_pairs > keys:
                raise ValueError(
                    f"mqar: num_pairs={self.num_pairs} needs at least {2 * self.num_pairs + 1} tokens "
                    f"(filler, keys, values), got vocab_size={self.vocab_size}"
                )
            if 2 * self.num_pairs + self.num_queries > self.seq_len:
                raise ValueError(
                    f"mqar: {self.num_pairs} pairs (2 tokens each) and {self.num_queries} queries need "
                    f"seq_len >= {2 * self.num_pairs + self.num_queries}, got {self.seq_len}"
                )
        elif self.name == "induction":
            if self.seq_len < 4 or self.vocab_size < 3:
                raise ValueError(
                    f"induction needs seq_len >= 4 and vocab_size >= 3, got {self.seq_len} and {self.vocab_size}"
                )
        elif self.vocab_size < 3 or self.seq_len < 2 * self.num_tokens + 1:
            raise ValueError(
                f"selective_copy: num_tokens={self.num_tokens} needs seq_len >= {2 * self.num_tokens + 1} and "
                f"vocab_size >= 3, got seq_len={self.seq_len}, vocab_size={self.vocab_size}"
            )

    def batch(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        return {"mqar": mqar, "induction": induction, "selective_copy": selective_copy}[self.name](
            self, batch_size, generator
        )


def _choose(n: int, k: int, rows: int, generator: torch.Generator) -> Tensor:
    """``[rows, k]``: for each row, ``k`` distinct integers from ``[0, n)`` in random order."""
    return torch.rand(rows, n, generator=generator).argsort(dim=1)[:, :k]


def mqar(task: Task, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Token 0 is filler; keys are ``1..K``, values ``K+1..2K`` (``K = (vocab_size - 1) // 2``).

    The context is ``k1 v1 k2 v2 ...`` (distinct keys, distinct values); after it, ``num_queries`` keys
    (drawn with repetition from the context's) stand at random positions of the rest, filler elsewhere.
    The target at a query is its key's value. ``query_power`` > 0 draws the j-th position after the
    context with weight ``(j + 1) ** -query_power``, so queries crowd towards the context (short recall
    distances), as Zoology's power-law spacing does; 0 draws them uniformly."""
    B, T, P, Q = batch_size, task.seq_len, task.num_pairs, task.num_queries
    K = (task.vocab_size - 1) // 2
    keys = 1 + _choose(K, P, B, generator)  # (B, P)
    values = 1 + K + _choose(K, P, B, generator)  # (B, P)
    inputs = torch.zeros(B, T, dtype=torch.long)
    targets = torch.full((B, T), IGNORE, dtype=torch.long)
    inputs[:, 0 : 2 * P : 2], inputs[:, 1 : 2 * P : 2] = keys, values
    which = torch.randint(0, P, (B, Q), generator=generator)  # which pair each query asks for
    if task.query_power:
        weights = torch.arange(1, T - 2 * P + 1, dtype=torch.float64) ** -task.query_power
        where = 2 * P + torch.multinomial(weights.expand(B, -1), Q, replacement=False, generator=generator)
    else:  # uniform (the draw every published figure here was made with)
        where = 2 * P + _choose(T - 2 * P, Q, B, generator)  # (B, Q) positions after the context
    rows = torch.arange(B)[:, None]
    inputs[rows, where] = keys.gather(1, which)
    targets[rows, where] = values.gather(1, which)
    return inputs, targets


def induction(task: Task, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Token 0 is the trigger, never elsewhere; the others are uniform noise. The trigger stands at a
    random position ``i <= T - 3``, followed by the answer; the last token is the trigger again, and the
    target there is the answer."""
    B, T = batch_size, task.seq_len
    inputs = torch.randint(1, task.vocab_size, (B, T), generator=generator)
    at = torch.randint(0, T - 2, (B,), generator=generator)
    rows = torch.arange(B)
    inputs[rows, at] = 0
    inputs[:, -1] = 0
    targets = torch.full((B, T), IGNORE, dtype=torch.long)
    targets[:, -1] = inputs[rows, at + 1]
    return inputs, targets


def selective_copy(task: Task, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Token 0 is noise, 1 the marker, data tokens ``2..V-1``. ``num_tokens`` data tokens stand at random
    positions (in order) of the first ``T - num_tokens`` positions; the last ``num_tokens`` are markers,
    and the target at the j-th marker is the j-th data token."""
    B, T, N = batch_size, task.seq_len, task.num_tokens
    L = T - N
    data = torch.randint(2, task.vocab_size, (B, N), generator=generator)
    where = _choose(L, N, B, generator).sort(dim=1).values
    inputs = torch.zeros(B, T, dtype=torch.long)
    rows = torch.arange(B)[:, None]
    inputs[rows, where] = data
    inputs[:, L:] = 1
    targets = torch.full((B, T), IGNORE, dtype=torch.long)
    targets[:, L:] = data
    return inputs, targets


# -- training ---------------------------------------------------------------------------------------------
@dataclass
class LearnResult:
    """Accuracy on a fixed evaluation set against training steps, and the final figures."""

    steps: list[int] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)  # training loss at the same steps (mean since the last)
    seconds: float = 0.0

    @property
    def final_accuracy(self) -> float:
        return self.accuracy[-1]

    def steps_to(self, accuracy: float) -> int | None:
        """The first evaluated step at which the accuracy reached ``accuracy`` (``None``: never)."""
        return next((s for s, a in zip(self.steps, self.accuracy, strict=True) if a >= accuracy), None)


def logits_of(model: nn.Module, inputs: Tensor) -> Tensor:
    """``model(inputs)``'s logits, for a seqmixers ``LanguageModel`` (which returns ``(logits, states)``) or
    any module returning logits."""
    out = model(inputs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def accuracy(model: nn.Module, inputs: Tensor, targets: Tensor, batch_size: int = 256) -> float:
    """Fraction of the asked positions (``targets != IGNORE``) where the most likely token is the target."""
    was_training = model.training
    model.eval()
    right = asked = 0
    for i in range(0, len(inputs), batch_size):
        x, y = inputs[i : i + batch_size], targets[i : i + batch_size]
        pred = logits_of(model, x).argmax(dim=-1)
        mask = y != IGNORE
        right += int((pred[mask] == y[mask]).sum())
        asked += int(mask.sum())
    model.train(was_training)
    return right / max(asked, 1)


def train_on_task(
    model: nn.Module,
    task: Task,
    *,
    steps: int = 600,
    batch_size: int = 64,
    lr: float = 3e-3,
    weight_decay: float = 0.0,
    warmup: int = 0,
    seed: int = 0,
    eval_every: int = 50,
    eval_size: int = 1024,
    stop_at: float | None = None,
    log: Callable[[int, float, float], None] | None = None,
) -> LearnResult:
    """Train ``model`` with AdamW on fresh batches of ``task`` (seeded by ``seed``) and evaluate accuracy
    on a fixed set of ``eval_size`` rows (drawn from a separate seed) every ``eval_every`` steps.

    The learning rate is constant after a linear warm-up of ``warmup`` steps; weight decay applies to
    matrices only (not to norms, biases or decay parameters), as is usual for transformers. ``stop_at``:
    stop at the first evaluation whose accuracy reaches it (tests that only ask *whether* a model learns).
    """
    eval_inputs, eval_targets = task.batch(eval_size, torch.Generator().manual_seed(10_000 + seed))
    optimizer = torch.optim.AdamW(decay_groups(model, weight_decay), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    result = LearnResult()
    start, running, count = time.perf_counter(), 0.0, 0
    model.train()
    for step in range(1, steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, step / warmup) if warmup else lr
        inputs, targets = task.batch(batch_size, generator)
        logits = logits_of(model, inputs)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=IGNORE)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        running, count = running + loss.item(), count + 1
        if step % eval_every == 0 or step == steps:
            acc = accuracy(model, eval_inputs, eval_targets)
            result.steps.append(step)
            result.accuracy.append(acc)
            result.loss.append(running / count)
            if log is not None:
                log(step, running / count, acc)
            running, count = 0.0, 0
            if stop_at is not None and acc >= stop_at:
                break
    result.seconds = time.perf_counter() - start
    return result


# -- command line ---------------------------------------------------------------------------------------
def _model_config(args: argparse.Namespace, task: Task) -> Any:
    from models.config import ModelConfig, load_run_config, resolve_config

    if args.model and args.model.lstrip().startswith("{"):
        config = ModelConfig.from_dict(json.loads(args.model))
    else:
        config = load_run_config(resolve_config(args.model or args.config))[0]
    return ModelConfig.from_dict({**config.to_dict(), "vocab_size": task.vocab_size})  # the task's vocabulary


def run(
    config: Any,
    task: Task,
    seeds: Sequence[int],
    *,
    progress: bool = True,
    **train_kwargs: Any,
) -> dict[int, LearnResult]:
    """Train a fresh model built from ``config`` (a ``ModelConfig`` or dict) on ``task`` once per seed,
    with the trainer's progress bar on stderr."""
    from models.lm import build_model

    results = {}
    for seed in seeds:
        torch.manual_seed(seed)
        model = build_model(config)
        with Progress(train_kwargs.get("steps", 600), f"seed {seed} ", enabled=progress) as bar:

            def log(step: int, loss: float, acc: float, bar: Progress = bar) -> None:
                bar.update(step, f"loss {loss:.3f} acc {acc:.3f}")

            results[seed] = train_on_task(model, task, seed=seed, log=log, **train_kwargs)
    return results


def summarize(results: Mapping[int, LearnResult]) -> dict[str, Any]:
    finals = [r.final_accuracy for r in results.values()]
    return {
        "mean": statistics.fmean(finals),
        "std": statistics.pstdev(finals),
        "min": min(finals),
        "max": max(finals),
        "per_seed": finals,
    }


def plot(curves: Mapping[str, Mapping[int, LearnResult]], title: str, path: Path) -> None:
    """Accuracy against steps, one colour per label, one line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (label, results) in enumerate(curves.items()):
        for j, r in enumerate(results.values()):
            ax.plot(r.steps, r.accuracy, color=f"C{i}", alpha=0.8, label=label if j == 0 else None)
    ax.set_xlabel("training step")
    ax.set_ylabel("accuracy on asked positions")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    from benchmarks.common import ROOT, run_info, write_json

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=TASKS, default="mqar")
    parser.add_argument("--config", default="transformer-tiny", help="a preset name or a config file")
    parser.add_argument("--model", help="a model config as JSON (or a file), instead of --config")
    for name in ("vocab_size", "seq_len", "num_pairs", "num_queries", "num_tokens"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(Task(), name))
    parser.add_argument("--query-power", type=float, default=0.0, help="mqar: query positions ~ (j+1)^-power")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=0)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "synthetic")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    task = Task(
        args.task, args.vocab_size, args.seq_len, args.num_pairs, args.num_queries, args.num_tokens, args.query_power
    )
    config = _model_config(args, task)
    results = run(
        config,
        task,
        args.seeds,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup=args.warmup,
        weight_decay=args.weight_decay,
        eval_every=args.eval_every,
    )
    print(f"{task.name}: {asdict(task)}")
    print(f"model: {config.describe().splitlines()[0] if hasattr(config, 'describe') else config}")
    steps = next(iter(results.values())).steps
    print("step  " + "  ".join(f"seed {s:>3}" for s in results))
    for i, step in enumerate(steps):
        print(f"{step:>4}  " + "  ".join(f"{r.accuracy[i]:>8.3f}" for r in results.values()))
    summary = summarize(results)
    print(f"final accuracy: mean {summary['mean']:.3f} (min {summary['min']:.3f}, max {summary['max']:.3f})")
    name = f"{task.name}-{args.config if not args.model else 'custom'}"
    plot({name: results}, f"{task.name}: accuracy against steps", args.out / f"{name}.png")
    write_json(
        args.out / f"{name}.json",
        {
            **run_info(args.threads),
            "task": asdict(task),
            "model": config.to_dict(),
            "train": {k: getattr(args, k) for k in ("steps", "batch_size", "lr", "warmup", "weight_decay")},
            "summary": summary,
            "runs": {seed: asdict(r) for seed, r in results.items()},
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
