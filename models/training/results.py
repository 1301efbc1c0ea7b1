"""How a run ends: ``TrainResult`` for one that trained to the end, ``TrainingDiverged`` for one stopped by a
loss that is not finite or a validation loss that ran away."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.lm import LanguageModel
from models.training import folder
from models.training.validation import perplexity

if TYPE_CHECKING:
    from models.training.state import TrainState


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
    tokenizer: Any = None  # the run's tokenizer (models.training.tokenizers.ByteTokenizer or BPETokenizer)

    @classmethod
    def of(cls, model: LanguageModel, state: TrainState, out: Path | None, tokenizer: Any) -> TrainResult:
        """The result of a run that trained ``model`` to its last step, as ``state`` recorded it, into the run
        folder ``out`` (if any)."""
        return cls(
            model=model,
            train_curve=state.train_curve,
            val_curve=state.val_curve,
            tokens_per_s=state.tokens / state.train_s,
            train_s=state.train_s,
            checkpoint=out / folder.LAST if out is not None else None,
            best=out / folder.BEST if out is not None and state.best_step is not None else None,
            best_step=state.best_step,
            best_val_loss=state.best_val_loss,
            tokenizer=tokenizer,
        )

    @property
    def val_loss(self) -> float:
        return self.val_curve[-1][1]

    @property
    def val_ppl(self) -> float:
        return perplexity(self.val_loss)


class TrainingDiverged(FloatingPointError):
    """The training loss was not finite, or the validation loss rose more than the margin above its best.

    ``best`` is the best checkpoint kept (None without a run folder), from ``best_step`` at ``best_val_loss``;
    ``checkpoint`` the last validated one (None if no validation was finite)."""

    def __init__(self, message: str, *, step: int, state: TrainState, out: Path | None) -> None:
        super().__init__(message)
        self.step, self.best_step, self.best_val_loss = step, state.best_step, state.best_val_loss
        kept = out is not None and state.best_step is not None
        self.best = out / folder.BEST if kept else None
        self.checkpoint = out / folder.LAST if kept else None
