"""The training loop: AdamW with warm-up and cosine decay on a byte-level corpus, with periodic validation
perplexity, checkpoints (each written atomically) and a sample at the end.

The run folder holds ``model.safetensors`` (the last validated model; or, after SIGINT/SIGTERM, the model
of the last completed step) and ``best.safetensors`` (the lowest validation loss so far). A run whose
validation loss rises more than ``DIVERGENCE_MARGIN`` above its best, or whose loss is not finite, stops
with ``TrainingDiverged`` and does not save the diverged weights.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import torch
import torch.nn.functional as F

from models import data as corpus
from models.checkpoint import read_header
from models.config import ConfigError, ModelConfig, TrainConfig
from models.lm import LanguageModel
from models.progress import Progress


@dataclass
class TrainResult:
    """What a run produced: the trained model, loss curves, throughput, final validation loss, sample."""

    model: LanguageModel
    train_curve: list[tuple[int, float]] = field(default_factory=list)  # (step, training loss)
    val_curve: list[tuple[int, float]] = field(default_factory=list)  # (step, validation loss)
    tokens_per_s: float = 0.0
    train_s: float = 0.0
    checkpoint: Path | None = None
    sample: str = ""
    best: Path | None = None  # the checkpoint of the lowest validation loss
    best_step: int | None = None
    best_val_loss: float = math.inf

    @property
    def val_loss(self) -> float:
        return self.val_curve[-1][1]

    @property
    def val_ppl(self) -> float:
        return perplexity(self.val_loss)


LAST, BEST = "model.safetensors", "best.safetensors"  # the run folder's checkpoints
# A validation loss more than this above the best so far (nats per token; x e = 2.7 in perplexity) stops
# the run: a healthy run's validation loss, on the same fixed batches each time, moves far less between
# validations, and a run at lr=10 that was not stopped went on to perplexity 1e16.
DIVERGENCE_MARGIN = 1.0


def perplexity(loss: float) -> float:
    """``exp(loss)``, infinite rather than an ``OverflowError`` for a diverged loss."""
    return math.inf if loss > 700 else math.exp(loss)


class TrainingDiverged(FloatingPointError):
    """The training loss was not finite, or the validation loss rose more than the margin above its best.

    ``best`` is the best checkpoint kept (None without a run folder), from ``best_step`` at ``best_val_loss``.
    """

    def __init__(self, message: str, *, step: int, result: TrainResult) -> None:
        super().__init__(message)
        self.step = step
        self.best, self.best_step, self.best_val_loss = result.best, result.best_step, result.best_val_loss
        self.checkpoint = result.checkpoint if result.best_step is not None else None  # the last good one


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped a run after ``step`` whole steps, whose model is saved in ``checkpoint``."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.signal_name = signal.Signals(signum).name
        saved = f"; saved {checkpoint}" if checkpoint is not None else ""
        super().__init__(f"interrupted by {self.signal_name} after step {step}{saved}")


class _StopSignals:
    """While it is entered (in the main thread), the first SIGINT or SIGTERM only asks the loop to stop after
    the current step, so that what is saved is a whole step; a second one interrupts at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopped without saving")
        self.signum = signum  # no printing here: the handler may run in the middle of a write to stderr

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def release(self) -> None:
        """Restore the handlers from before (a signal from now on acts as it did before training)."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def __exit__(self, *exc: object) -> None:
        self.release()


def run_folder_checkpoints(out: str | Path) -> list[str]:
    """The checkpoints already in run folder ``out``, each as ``"name: step N, val loss X"``; [] if none."""
    found = []
    for name in (LAST, BEST):
        path = Path(out) / name
        if not path.exists():
            continue
        try:
            info = read_header(path)[1]
        except (ValueError, OSError) as exc:  # CheckpointError is a ValueError
            found.append(f"{name}: unreadable ({exc})")
            continue
        val = info.get("val_loss")
        what = f"val loss {val:.3f}" if isinstance(val, (int, float)) else f"saved on {info.get('interrupted', '?')}"
        found.append(f"{name}: step {info.get('step', '?')}, {what}")
    return found


def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``min_lr_ratio * lr`` at the last step."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    progress = (step - tc.warmup_steps) / max(1, tc.steps - tc.warmup_steps)
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Optimizer parameter groups with weight decay on matrices only (not on norms, biases, or per-head
    scales), as is usual for transformers."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def make_optimizer(model: LanguageModel, tc: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (``decay_groups``)."""
    return torch.optim.AdamW(decay_groups(model, tc.weight_decay), lr=tc.lr, betas=(tc.beta1, tc.beta2))


@torch.no_grad()
def evaluate(model: LanguageModel, batches: list[tuple[torch.Tensor, ...]], tc: TrainConfig) -> float:
    """Mean next-token cross-entropy (nats) over ``batches``: each ``(x [B, T], y [B, T])``, or packed,
    ``(x [1, T], y [1, T], cu_seqlens)`` with ``y = -100`` where nothing is counted (the sum of the losses
    over the count of counted targets)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y, *packed in batches:
        x, y = x.to(model.device), y.to(model.device)
        cu_seqlens = packed[0].to(model.device) if packed else None
        logits, _ = model(x, mode=tc.mode, chunk_size=tc.chunk_size, cu_seqlens=cu_seqlens)  # (B, T, V)
        total += F.cross_entropy(
            logits.flatten(0, 1).float(), y.flatten(), ignore_index=corpus.IGNORE, reduction="sum"
        ).item()
        count += int((y != corpus.IGNORE).sum())
    model.train(was_training)
    return total / count


def _batches(
    data: bytes, tc: TrainConfig
) -> tuple[Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]], list]:
    """``(next_batch, val_batches)``: ``next_batch(generator)`` gives ``(x, y, cu_seqlens or None, real tokens)``.

    ``documents="none"``: random windows of the corpus (``[B, T]``, no ``cu_seqlens``) and fixed windows of
    its held-out end. Otherwise: random packed rows of the training documents and fixed rows of the held-out
    documents, each batch flattened into one row ``[1, B*T]`` with its ``cu_seqlens``."""
    if tc.documents == "none":
        train_data, val_data = corpus.split(data, tc.val_fraction, tc.seq_len)

        def windows(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, None, int]:
            x, y = corpus.random_batch(train_data, tc.batch_size, tc.seq_len, gen)
            return x, y, None, x.numel()

        return windows, corpus.fixed_batches(val_data, tc.batch_size, tc.seq_len, tc.eval_batches)
    docs = corpus.documents(data, tc.documents, separator=tc.separator, field=tc.jsonl_field)
    tokens = [doc for doc in corpus.tokenize_documents(docs) if doc.numel() >= 2]
    train_docs, val_docs = corpus.split_documents(tokens, tc.val_fraction)
    train_rows = corpus.pack_documents(train_docs, tc.seq_len)
    val_rows = corpus.pack_documents(val_docs, tc.seq_len)

    def rows(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        picked = corpus.random_rows(train_rows, tc.batch_size, gen)
        x, y, cu_seqlens = train_rows.batch(picked)
        return x, y, cu_seqlens, int(train_rows.n_real[picked].sum())

    return rows, corpus.fixed_packed_batches(val_rows, tc.batch_size, tc.eval_batches)


def train(
    model_config: ModelConfig,
    train_config: TrainConfig,
    *,
    data: bytes | None = None,
    out: str | Path | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
    label: str = "",
    divergence_margin: float = DIVERGENCE_MARGIN,
) -> TrainResult:
    """Train a model from scratch on ``data`` (default: the embedded corpus).

    With ``out``, the checkpoint ``out/model.safetensors`` is written at every validation (atomically), and
    ``out/best.safetensors`` whenever the validation loss is the lowest so far.

    Raises ``TrainingDiverged`` when the loss is not finite or the validation loss exceeds its best by more
    than ``divergence_margin`` (the diverged weights are not saved), and ``Interrupted`` on SIGINT or SIGTERM,
    after finishing the current step and saving its model to ``out/model.safetensors``.
    Returns the model, the curves and the throughput.
    """
    with _StopSignals() as stop:
        return _run(model_config, train_config, data, out, device, progress, label, divergence_margin, stop)


def _run(
    model_config: ModelConfig,
    train_config: TrainConfig,
    data: bytes | None,
    out: str | Path | None,
    device: torch.device | str,
    progress: bool,
    label: str,
    divergence_margin: float,
    stop: _StopSignals,
) -> TrainResult:
    tc = train_config
    if model_config.vocab_size < corpus.BYTE_VOCAB:
        raise ConfigError(
            f"vocab_size={model_config.vocab_size} is too small for the byte tokenizer, which needs "
            f">= {corpus.BYTE_VOCAB}"
        )
    next_batch, val_batches = _batches(corpus.load_corpus() if data is None else data, tc)
    torch.manual_seed(tc.seed)
    model = LanguageModel(model_config).to(device)
    model.train()
    optimizer = make_optimizer(model, tc)
    gen = torch.Generator().manual_seed(tc.seed)
    checkpoint = Path(out) / LAST if out is not None else None
    best = Path(out) / BEST if out is not None else None
    result = TrainResult(model=model, checkpoint=checkpoint)
    bar = Progress(tc.steps, label, enabled=progress)
    tokens = 0  # the real tokens trained on so far (padding not counted)

    def metadata(step: int) -> dict:
        """What each checkpoint carries; ``read_header(path)[1]`` returns it."""
        return {
            "step": step,
            "best_step": result.best_step,
            "best_val_loss": result.best_val_loss,
            "train": tc.to_dict(),
        }

    def validate(step: int) -> None:
        val = evaluate(model, val_batches, tc)
        result.val_curve.append((step, val))
        line = f"step {step:>5}/{tc.steps}  val loss {val:.3f}  val ppl {perplexity(val):7.2f}"
        if result.train_curve:
            speed = tokens / result.train_s
            line += f"  train loss {result.train_curve[-1][1]:.3f}  {speed:,.0f} tok/s"
        bar.log(line)
        if not val <= result.best_val_loss + divergence_margin:  # NaN included
            why = "is not finite" if not math.isfinite(val) else f"is more than {divergence_margin} above the best"
            bar.close()
            raise TrainingDiverged(
                f"training diverged at step {step}: validation loss {val:.3f} {why}; best {result.best_val_loss:.3f} "
                f"(step {result.best_step}); lower lr (now {tc.lr})",
                step=step,
                result=result,
            )
        improved = val < result.best_val_loss
        if improved:
            result.best_step, result.best_val_loss, result.best = step, val, best
        if checkpoint is not None:
            info = {"val_loss": val, **metadata(step)}
            model.save(checkpoint, metadata=info)
            if improved:
                model.save(best, metadata=info)

    def interrupt(done: int) -> NoReturn:
        """Save the model of the last whole step, then raise. This is the one place that saves a run's state
        on the way out: the optimizer state and the data RNG for resuming will go beside it, in
        ``out/train_state.safetensors``, and its step is ``read_header(out/model.safetensors)[1]["step"]``."""
        assert stop.signum is not None
        if checkpoint is not None:
            last = result.val_curve[-1]
            info = {**metadata(done), "interrupted": signal.Signals(stop.signum).name}
            model.save(checkpoint, metadata={**info, "last_val_step": last[0], "last_val_loss": last[1]})
        raise Interrupted(stop.signum, done, checkpoint)

    validate(0)
    for step in range(1, tc.steps + 1):
        if stop.signum is not None:
            bar.close()
            interrupt(step - 1)
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step - 1, tc)
        x, y, cu_seqlens, n_real = next_batch(gen)
        x, y = x.to(device), y.to(device)
        cu_seqlens = cu_seqlens.to(device) if cu_seqlens is not None else None
        logits, _ = model(x, mode=tc.mode, chunk_size=tc.chunk_size, cu_seqlens=cu_seqlens)  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=corpus.IGNORE)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        optimizer.step()
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            bar.close()
            raise TrainingDiverged(
                f"training diverged at step {step}: loss {loss_value}; lower lr (now {tc.lr})", step=step, result=result
            )
        result.train_s += time.perf_counter() - t0
        result.train_curve.append((step, loss_value))
        tokens += n_real
        speed = tokens / result.train_s
        bar.update(step, f"loss {loss_value:.3f} {speed:,.0f} tok/s")
        if step % tc.eval_every == 0 or step == tc.steps:
            validate(step)
    bar.close()
    stop.release()  # from here (the sample), Ctrl-C interrupts at once: the last checkpoint is saved
    if stop.signum is not None:
        raise Interrupted(stop.signum, tc.steps, checkpoint)
    result.tokens_per_s = tokens / result.train_s
    if tc.sample_tokens:
        prompt = corpus.encode(tc.sample_prompt) if tc.sample_prompt else torch.tensor([ord("\n")])
        out_tokens = model.generate(
            prompt, tc.sample_tokens, temperature=tc.temperature, top_k=tc.top_k, seed=tc.seed
        )  # (T + new,)
        result.sample = corpus.decode(out_tokens)
    model.eval()
    return result
