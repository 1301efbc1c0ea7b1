"""The training loop: AdamW with warm-up and cosine decay on a byte-level corpus, with periodic validation
perplexity, checkpoints (each written atomically) and a sample at the end."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import torch
import torch.nn.functional as F

from models import data as corpus
from models.config import ConfigError, ModelConfig, TrainConfig
from models.lm import LanguageModel


class Progress:
    """A one-line progress bar on stderr (redrawn in place on a terminal; log lines only otherwise)."""

    def __init__(self, total: int, label: str = "", stream: TextIO | None = None, enabled: bool = True) -> None:
        self.total, self.label, self.enabled = total, label, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.live = enabled and self.stream.isatty()
        self.start = time.perf_counter()
        self._last_draw = 0.0
        self._line = ""

    def update(self, done: int, text: str = "") -> None:
        if not self.live:
            return
        now = time.perf_counter()
        if done < self.total and now - self._last_draw < 0.1:
            return
        self._last_draw = now
        width = 24
        filled = int(width * done / max(self.total, 1))
        elapsed = now - self.start
        eta = elapsed / done * (self.total - done) if done else 0.0
        bar = "#" * filled + "-" * (width - filled)
        self._line = f"{self.label}[{bar}] {done}/{self.total} {text} eta {eta:.0f}s"
        self.stream.write("\r\x1b[2K" + self._line)
        self.stream.flush()

    def log(self, line: str) -> None:
        """Print a line above the bar."""
        if not self.enabled:
            return
        if self.live:
            self.stream.write("\r\x1b[2K")
        self.stream.write(f"{self.label}{line}\n")
        if self.live and self._line:
            self.stream.write(self._line)
        self.stream.flush()

    def close(self) -> None:
        if self.live:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()


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

    @property
    def val_loss(self) -> float:
        return self.val_curve[-1][1]

    @property
    def val_ppl(self) -> float:
        return math.exp(self.val_loss)


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
def evaluate(model: LanguageModel, batches: list[tuple[torch.Tensor, torch.Tensor]], tc: TrainConfig) -> float:
    """Mean next-token cross-entropy (nats) over ``batches``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in batches:
        x, y = x.to(model.device), y.to(model.device)
        logits, _ = model(x, mode=tc.mode, chunk_size=tc.chunk_size)  # (B, T, V)
        total += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum").item()
        count += y.numel()
    model.train(was_training)
    return total / count


def train(
    model_config: ModelConfig,
    train_config: TrainConfig,
    *,
    data: bytes | None = None,
    out: str | Path | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
    label: str = "",
) -> TrainResult:
    """Train a model from scratch on ``data`` (default: the embedded corpus).

    With ``out``, the checkpoint ``out/model.safetensors`` is written at every validation (atomically),
    so an interrupted run keeps its last one. Returns the model, the curves and the throughput.
    """
    tc = train_config
    if model_config.vocab_size < corpus.BYTE_VOCAB:
        raise ConfigError(
            f"vocab_size={model_config.vocab_size} is too small for the byte tokenizer, which needs "
            f">= {corpus.BYTE_VOCAB}"
        )
    train_data, val_data = corpus.split(corpus.load_corpus() if data is None else data, tc.val_fraction, tc.seq_len)
    val_batches = corpus.fixed_batches(val_data, tc.batch_size, tc.seq_len, tc.eval_batches)
    torch.manual_seed(tc.seed)
    model = LanguageModel(model_config).to(device)
    model.train()
    optimizer = make_optimizer(model, tc)
    gen = torch.Generator().manual_seed(tc.seed)
    checkpoint = Path(out) / "model.safetensors" if out is not None else None
    result = TrainResult(model=model, checkpoint=checkpoint)
    bar = Progress(tc.steps, label, enabled=progress)
    tokens_per_step = tc.batch_size * tc.seq_len

    def validate(step: int) -> None:
        val = evaluate(model, val_batches, tc)
        result.val_curve.append((step, val))
        line = f"step {step:>5}/{tc.steps}  val loss {val:.3f}  val ppl {math.exp(val):7.2f}"
        if result.train_curve:
            speed = tokens_per_step * len(result.train_curve) / result.train_s
            line += f"  train loss {result.train_curve[-1][1]:.3f}  {speed:,.0f} tok/s"
        bar.log(line)
        if checkpoint is not None:
            model.save(checkpoint, metadata={"step": step, "val_loss": val, "train": tc.to_dict()})

    validate(0)
    for step in range(1, tc.steps + 1):
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step - 1, tc)
        x, y = corpus.random_batch(train_data, tc.batch_size, tc.seq_len, gen)
        x, y = x.to(device), y.to(device)
        logits, _ = model(x, mode=tc.mode, chunk_size=tc.chunk_size)  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        optimizer.step()
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            bar.close()
            raise FloatingPointError(f"training diverged at step {step}: loss {loss_value}; lower lr (now {tc.lr})")
        result.train_s += time.perf_counter() - t0
        result.train_curve.append((step, loss_value))
        speed = tokens_per_step * step / result.train_s
        bar.update(step, f"loss {loss_value:.3f} {speed:,.0f} tok/s")
        if step % tc.eval_every == 0 or step == tc.steps:
            validate(step)
    bar.close()
    result.tokens_per_s = tokens_per_step * tc.steps / result.train_s
    if tc.sample_tokens:
        prompt = corpus.encode(tc.sample_prompt) if tc.sample_prompt else torch.tensor([ord("\n")])
        out_tokens = model.generate(
            prompt, tc.sample_tokens, temperature=tc.temperature, top_k=tc.top_k, seed=tc.seed
        )  # (T + new,)
        result.sample = corpus.decode(out_tokens)
    model.eval()
    return result
