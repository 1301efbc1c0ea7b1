"""The training loop: AdamW with warm-up and cosine decay on a byte-level corpus, with periodic validation
perplexity, checkpoints (each written atomically) and a sample at the end.

The run folder holds ``model.safetensors`` (the last validated model; or, after SIGINT/SIGTERM, the model
of the last completed step) and ``best.safetensors`` (the lowest validation loss so far). A run whose
validation loss rises more than ``DIVERGENCE_MARGIN`` above its best, or whose loss is not finite, stops
with ``TrainingDiverged`` and does not save the diverged weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.nn.functional as F

from mixers.context_parallel import ContextParallel, context_parallel, reduce_gradients
from mixers.registry import get_registry
from models import data as corpus
from models import distributed, train_state
from models.checkpoint import read_header, remove_stale_temporaries
from models.config import ConfigError, ModelConfig, TrainConfig
from models.corpus import (
    TOKENIZER_FILE,
    BPETokenizer,
    ByteTokenizer,
    TokenCache,
    Tokenizer,
    build_token_cache,
    iter_texts,
    open_token_cache,
    source_files,
)
from models.distributed import World
from models.lm import LanguageModel
from models.progress import Progress
from models.runlog import RunLog

try:
    import fcntl
except ImportError:  # pragma: no cover (Windows: no advisory locks; a run folder is then not locked)
    fcntl = None


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
    tokenizer: Any = None  # the run's tokenizer (models.corpus.ByteTokenizer or BPETokenizer)

    @property
    def val_loss(self) -> float:
        return self.val_curve[-1][1]

    @property
    def val_ppl(self) -> float:
        return perplexity(self.val_loss)


LAST, BEST = "model.safetensors", "best.safetensors"  # the run folder's checkpoints
LOG, CURVES = "log.jsonl", "curves.png"  # the run log (rank 0) and its plot (by the command, at the end)
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


def corpus_needs(tc: TrainConfig) -> int:
    """The fewest tokens that leave more than ``seq_len`` tokens to both the training part and the held-out
    ``val_fraction`` of a corpus trained on random windows (``documents="none"``)."""
    seq_len, fraction = tc.seq_len, tc.val_fraction
    need = math.ceil((seq_len + 1) / fraction)
    while int(need * fraction) < seq_len + 1 or need - int(need * fraction) < seq_len + 1:
        need += 1
    return need


def check_corpus_size(n: int, tc: TrainConfig, source: str, unit: str = "bytes") -> None:
    """Raise a ``ConfigError`` when ``n`` tokens (``unit``) are too few for ``corpus_needs``."""
    need = corpus_needs(tc)
    if n >= need:
        return
    what = "is empty" if not n else f"holds {n:,} {unit}"
    raise ConfigError(
        f"{source} {what}; seq_len={tc.seq_len} with val_fraction={tc.val_fraction} needs at least {need:,} {unit} "
        f"(more than seq_len for validation, and for training): give more text or a smaller seq_len"
    )


CACHE_DIR, CACHE_NAME = "cache", "tokens.bin"  # the token cache of a run from a path: OUT/cache/tokens.bin


def cache_options(tc: TrainConfig) -> dict[str, str]:
    """The ``models.corpus`` reading options for ``tc.documents``: ``"none"`` reads each text file (and each JSONL
    record) as one document, ``"lines"``/``"separator"`` split text files, ``"jsonl"`` reads every file as JSONL."""
    documents = {"none": "file", "jsonl": "file"}.get(tc.documents, tc.documents)
    return {
        "fmt": "jsonl" if tc.documents == "jsonl" else "auto",
        "field": tc.jsonl_field,
        "documents": documents,
        "separator": tc.separator,
    }


# The train-config fields that decide what a run trains and validates on: a resumed run keeps them.
DATA_FIELDS = (
    "documents", "separator", "jsonl_field", "tokenizer", "bpe_vocab", "seq_len", "batch_size", "val_fraction",
    "eval_batches",
)  # fmt: skip


def data_record(data: bytes | None, source: str | Path | None, tc: TrainConfig) -> dict[str, Any]:
    """What a run trains on, as saved in its training state (without its tokenizer, added once known): the
    embedded corpus or in-memory bytes by SHA-256, or a path with each file's size and modification time (the
    token cache's own test of change, so that recording costs no read of the data)."""
    if source is None:
        text = corpus.load_corpus() if data is None else data
        kind = "embedded" if data is None else "bytes"
        return {"kind": kind, "sha256": hashlib.sha256(text).hexdigest(), "bytes": len(text)}
    files = []
    for path, _ in source_files(source, fmt=cache_options(tc)["fmt"]):
        st = path.stat()
        files.append({"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return {"kind": "path", "path": str(Path(source).resolve()), "files": files}


def _describe_data(record: dict[str, Any]) -> str:
    if record["kind"] == "path":
        return f"{record['path']} ({len(record['files'])} file(s))"
    what = "the embedded corpus" if record["kind"] == "embedded" else "bytes given to train(data=...)"
    return f"{what} ({record['bytes']:,} bytes, sha256 {record['sha256'][:12]})"


def data_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """How the data ``now`` differs from the ``saved`` record (tokenizers aside); [] when it is the same."""
    if any(saved.get(key) != now.get(key) for key in ("kind", "path", "sha256")):
        return [f"the data was {_describe_data(saved)}, now {_describe_data(now)}"]
    if saved["kind"] != "path":
        return []
    was, is_ = {f["path"]: f for f in saved["files"]}, {f["path"]: f for f in now["files"]}
    changes = [f"{path} is missing" for path in was if path not in is_]
    changes += [f"{path} is new" for path in is_ if path not in was]
    for path in was.keys() & is_.keys():
        a, b = was[path], is_[path]
        if a["size"] != b["size"]:
            changes.append(f"{path} changed size: {a['size']:,} -> {b['size']:,} bytes")
        elif a["mtime_ns"] != b["mtime_ns"]:
            changes.append(f"{path} was modified (same size, another modification time)")
    return sorted(changes)


class RunLocked(ConfigError):
    """Another process is training into the same run folder."""


LOCK = ".lock"  # in the run folder: who holds it, while a run trains into that folder


@contextlib.contextmanager
def run_folder_lock(out: Path | None, world: World) -> Iterator[None]:
    """Hold an exclusive lock on run folder ``out`` (rank 0 takes it, every rank learns whether it could) while a
    run writes there: a second run, or a second ``--resume`` of the same run, is refused with who holds it.
    Once the lock is held, the temporaries that killed writers left in the folder are removed."""
    if out is None or fcntl is None:
        yield
        return

    def take() -> Any:
        out.mkdir(parents=True, exist_ok=True)
        handle = open(out / LOCK, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunLocked(
                f"the run folder {out} is in use by {holder}: two runs writing one folder would overwrite each "
                f"other's checkpoints and training state; wait for that one to end, or write elsewhere (--out DIR)"
            ) from None
        handle.seek(0)
        handle.truncate()
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {started} ({' '.join(sys.argv)})\n")
        handle.flush()
        _remove_stale_temporaries(out)
        return handle

    handle = _on_main(world, True, "lock the run folder", take)
    try:
        yield
    finally:
        if handle is not None:
            handle.close()  # releases the lock


def _remove_stale_temporaries(out: Path) -> None:
    """Remove what writers of the run folder killed mid-save left (their process is gone): checkpoint,
    tokenizer, plot and token-cache temporaries, and an unfinished training-state save."""
    for name in (LAST, BEST, CURVES, TOKENIZER_FILE):
        remove_stale_temporaries(out / name)
    for path in (out / CACHE_DIR).glob(".*.tmp"):  # only a run into this folder builds its cache: none is now
        path.unlink(missing_ok=True)
    shutil.rmtree(out / f"{train_state.STATE}.tmp", ignore_errors=True)  # the lock: no save is under way


def _batches(
    data: bytes | TokenCache, tc: TrainConfig, label: str = "the data"
) -> tuple[Callable[[torch.Generator], Any], Callable[[Any], tuple], list]:
    """``(draw, make, val_batches)``: ``draw(generator)`` picks a step's global batch (``batch_size`` rows; the same
    on every rank, from the same generator), ``make(rows)`` reads the picked rows into ``(x, y, cu_seqlens or None,
    real tokens)``, so that each rank reads only its own rows.

    ``documents="none"``: random windows of the corpus (``[B, T]``, no ``cu_seqlens``) and fixed windows of
    its held-out end. Otherwise: random packed rows of the training documents and fixed rows of the held-out
    documents, each batch flattened into one row ``[1, B*T]`` with its ``cu_seqlens``.

    ``data`` is the corpus's bytes (read whole) or a ``TokenCache`` (``_cache_batches``)."""
    if isinstance(data, TokenCache):
        return _cache_batches(data, tc, label)
    if tc.documents == "none":
        train_data, val_data = corpus.split(data, tc.val_fraction, tc.seq_len)

        def starts(gen: torch.Generator) -> torch.Tensor:
            return corpus.random_starts(train_data, tc.batch_size, tc.seq_len, gen)

        def windows(picked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, int]:
            x, y = corpus.windows(train_data, picked, tc.seq_len)
            return x, y, None, x.numel()

        return starts, windows, corpus.fixed_batches(val_data, tc.batch_size, tc.seq_len, tc.eval_batches)
    docs = corpus.documents(data, tc.documents, separator=tc.separator, field=tc.jsonl_field)
    tokens = [doc for doc in corpus.tokenize_documents(docs) if doc.numel() >= 2]
    train_docs, val_docs = corpus.split_documents(tokens, tc.val_fraction)
    train_rows = corpus.pack_documents(train_docs, tc.seq_len)
    val_rows = corpus.pack_documents(val_docs, tc.seq_len)

    def pick(gen: torch.Generator) -> torch.Tensor:
        return corpus.random_rows(train_rows, tc.batch_size, gen)

    def rows(picked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        x, y, cu_seqlens = train_rows.batch(picked)
        return x, y, cu_seqlens, int(train_rows.n_real[picked].sum())

    return pick, rows, corpus.fixed_packed_batches(val_rows, tc.batch_size, tc.eval_batches)


def _cache_batches(
    cache: TokenCache, tc: TrainConfig, label: str = "the data"
) -> tuple[Callable[[torch.Generator], Any], Callable[[Any], tuple], list]:
    """``_batches`` from a memory-mapped token cache; each batch reads only the tokens it needs.

    ``documents="none"``: the last ``int(N * val_fraction)`` tokens are held out, and the windows are those the
    in-memory path gives for the same tokens and generator (same starts). Otherwise the last ``val_fraction``
    of the documents is held out; a training row starts at a random token (``TokenCache.random_positions``) and
    packs the rest of its document, then the documents after it, by ``models.data.pack_documents``'s rules;
    validation takes rows at positions spread evenly over the held-out documents (``TokenCache.fixed_packed``).
    """
    if tc.documents == "none":
        check_corpus_size(len(cache), tc, label, "tokens")
        train_part, val_part = cache.split(tc.val_fraction, by="tokens")

        def starts(gen: torch.Generator) -> torch.Tensor:
            return train_part.random_window_starts(tc.batch_size, tc.seq_len, gen)

        def windows(picked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, int]:
            x, y = train_part.windows_at(picked, tc.seq_len)
            return x, y, None, x.numel()

        return starts, windows, val_part.fixed_windows(tc.batch_size, tc.seq_len, tc.eval_batches)
    usable = _documents_with_a_target(cache)
    if usable >= 2:
        train_part, val_part = cache.split(tc.val_fraction)
    if usable < 2 or not _documents_with_a_target(train_part) or not _documents_with_a_target(val_part):
        raise corpus.DocumentError(
            f"the data holds {usable} document(s) of 2 or more tokens; training and validation need at least one "
            f"each: give more documents"
        )

    def pick(gen: torch.Generator) -> torch.Tensor:
        return train_part.random_positions(tc.batch_size, gen)

    def rows(picked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        packed = train_part.rows_at(picked, tc.seq_len)
        x, y, cu_seqlens = packed.batch(torch.arange(len(packed)))
        return x, y, cu_seqlens, int(packed.n_real.sum())

    return pick, rows, val_part.fixed_packed(tc.batch_size, tc.seq_len, tc.eval_batches)


def _documents_with_a_target(part: TokenCache) -> int:
    """How many documents of ``part`` have 2 or more tokens (something to predict)."""
    return int((torch.diff(part.doc_starts, append=torch.tensor([len(part)])) >= 2).sum())


def _context_parallel(k: int, world: World, parallel: str, tc: TrainConfig) -> ContextParallel | None:
    """The context parallelism of a run over ``k`` ranks (``None`` for k = 1), checked against the run."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"context_parallel must be an int >= 1 (ranks per sequence), got {k!r}")
    if k == 1:
        return None
    problems = [
        f"it must equal the number of ranks ({world.size}): data and context parallelism together are not supported yet"
        if k != world.size
        else "",
        f"it needs parallel='none', got {parallel!r}" if parallel != "none" else "",
        f"seq_len={tc.seq_len} must be a multiple of it" if tc.seq_len % k else "",
        f"it needs documents='none' (no packed sequences), got {tc.documents!r}" if tc.documents != "none" else "",
    ]
    problems = [p for p in problems if p]
    if problems:
        raise ConfigError(f"context_parallel={k}: " + "; ".join(problems))
    return ContextParallel.of()


def _on_main(world: World, shared: bool, what: str, fn: Callable[[], Any]) -> Any:
    """``fn()`` on rank 0 while the other ranks wait (every rank, when not ``shared``); returns its result there
    and ``None`` on the others. A failure on rank 0 is raised there, and on the others as a ``ConfigError`` (the
    wait is a collective that also tells every rank whether rank 0 failed, so that none hangs)."""
    if not shared or world.size == 1:
        return fn()
    result, failed = None, False
    if world.main:
        try:
            result = fn()
        except Exception:
            failed = True
            distributed.all_sum(1, world)
            raise
    if distributed.all_sum(int(failed), world):
        raise ConfigError(f"rank 0 could not {what}: see its error")
    return result


def micro_batches(picked: torch.Tensor, accumulate: int, world: World) -> list[torch.Tensor]:
    """This rank's rows of each of the ``accumulate`` micro-batches of a step's global batch ``picked``: micro-batch
    m is ``picked``'s m-th slice, of which rank r takes the r-th part. The global batch, and so the loss and the
    gradient, are the same for any number of ranks and micro-batches."""
    per_micro = len(picked) // accumulate
    per_rank = per_micro // world.size
    return [picked[m * per_micro + world.rank * per_rank :][:per_rank] for m in range(accumulate)]


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
    parallel: str = "none",
    resume: str | Path | train_state.Saved | None = None,
    context_parallel: int = 1,
    source: str | Path | None = None,
    allow_new_data: bool = False,
) -> TrainResult:
    """Train a model from scratch on ``data`` (default: the embedded corpus), or on ``source``: a text file, a
    folder of text and JSONL files, or a JSONL file, streamed from disk into a memory-mapped token cache
    (``out/cache/tokens.bin``, reused while the files and options are unchanged; docs/training-data.md).
    ``train_config.tokenizer="bpe"`` trains a BPE tokenizer on the data first and saves it to
    ``out/tokenizer.json``; ``result.tokenizer`` is the run's tokenizer.

    With ``out``, the checkpoint ``out/model.safetensors`` is written at every validation (atomically), and
    ``out/best.safetensors`` whenever the validation loss is the lowest so far.

    ``parallel``: ``"none"`` (one process), or ``"ddp"`` / ``"fsdp"`` in each of the processes torchrun starts
    (``models.distributed``): each rank reads and computes its share of every global batch of ``batch_size``
    rows, and the losses, the learning-rate schedule and the result do not depend on the number of ranks.
    Rank 0 prints, validates into the checkpoints and samples.

    With ``out``, the whole training state (model, optimizer, every rank's RNG, the data position, the step and
    curves) is saved to ``out/train_state`` every ``save_every`` steps and when the run is interrupted
    (``models.train_state``); ``resume`` (a run folder holding one) continues that run where it stopped: with
    one process, the result is bit-identical to the uninterrupted run. The state is checked first (every file
    against its checksum, every field of its ``meta.json``). A resumed run trains on the data the state records
    (the embedded corpus, or the same path) when neither ``data`` nor ``source`` is given; data that differs from
    the saved run's (other files, changed files, other ``DATA_FIELDS``) is refused with what changed, unless
    ``allow_new_data`` (the best validation so far is then forgotten: it measured other data). Resuming into
    another ``out`` first copies the run's checkpoints and log there.
    While a run trains into ``out``, the folder is locked (``run_folder_lock``): a second run into it is refused.

    ``context_parallel`` (K > 1, equal to the number of ranks, with ``parallel="none"``): every rank takes the
    whole global batch and its K-th of each sequence's time (``mixers.context_parallel``); the gradients are
    summed over the ranks. Validation runs whole sequences on every rank.

    Raises ``TrainingDiverged`` when the loss is not finite or the validation loss exceeds its best by more
    than ``divergence_margin`` (the diverged weights are not saved), and ``Interrupted`` on SIGINT or SIGTERM,
    after finishing the current step and saving its model to ``out/model.safetensors``.
    Returns the model, the curves and the throughput.
    """
    world = distributed.setup(device)
    try:
        distributed.check_parallel(parallel, world, context_parallel)
        out = Path(out) if out is not None else None
        saved = _saved_state(resume, train_config) if resume is not None else None
        if saved is not None and data is None and source is None:
            data, source = _saved_data(saved)
        with _StopSignals() as stop, run_folder_lock(out, world):
            if saved is not None and out is not None and world.main:
                _carry_over(saved.path.parent, out)
            run = _Run(
                model_config, train_config, data, out, world, parallel, progress, label, divergence_margin,
                context_parallel, source=source, saved=saved, allow_new_data=allow_new_data,
            )  # fmt: skip
            with run.log:  # closed however the run ends
                return run.loop(stop)
    finally:
        distributed.teardown(world)


def _saved_state(resume: str | Path | train_state.Saved, tc: TrainConfig) -> train_state.Saved:
    """The checked training state of run ``resume`` (read and checked here unless it already was), refused when
    it leaves no step to train."""
    saved = resume if isinstance(resume, train_state.Saved) else train_state.read(resume)
    if saved.step >= tc.steps:
        raise train_state.ResumeError(
            f"the run in {saved.path.parent} has done {saved.step} steps and this resume asks for {tc.steps} in all: "
            f"nothing is left to train; give --steps (train.steps) greater than {saved.step} to go on"
        )
    return saved


def _saved_data(saved: train_state.Saved) -> tuple[bytes | None, str | None]:
    """``(data, source)`` that give the data a saved run trained on."""
    record = saved.data
    if record["kind"] == "bytes":
        raise train_state.ResumeError(
            f"the run in {saved.path.parent} trained on bytes given to train(data=...), which its state does not "
            f"hold: give the same bytes again"
        )
    return None, record["path"] if record["kind"] == "path" else None


def _resumed_data_changes(saved: train_state.Saved, record: dict[str, Any], tc: TrainConfig, allow: bool) -> list[str]:
    """What differs between the data a saved run trained on and this resume's; refused unless ``allow``."""
    changes = data_changes(saved.data, record) + [
        f"train.{name}: saved {getattr(saved.train, name)!r}, now {getattr(tc, name)!r}"
        for name in DATA_FIELDS
        if getattr(saved.train, name) != getattr(tc, name)
    ]
    if changes and not allow:
        raise train_state.ResumeError(
            f"the run in {saved.path.parent} trained on other data than this resume would: {'; '.join(changes)}. "
            f"To go on as it was, resume without --data or data options; to train on this data anyway, add "
            f"--allow-new-data (allow_new_data=True; its best validation so far is then forgotten)"
        )
    return changes


def _parallel_note(world: World, parallel: str, tc: TrainConfig, cp_ranks: int) -> str:
    """The log line that says over how many ranks, and how, a run trains."""
    backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "?"
    how = f"context parallelism over {cp_ranks} ranks" if cp_ranks > 1 else parallel.upper()
    rows = tc.batch_size if cp_ranks > 1 else tc.batch_size // (world.size * tc.accumulate)
    split = "every rank" if cp_ranks > 1 else f"{world.size} ranks x"
    return (
        f"parallel: {how} on {world.size} ranks ({backend}, {world.device.type}); each step's {tc.batch_size} rows: "
        f"{split} {rows} rows x {tc.accumulate} micro-batch(es)"
    )


def _carry_over(run_folder: Path, out: Path) -> None:
    """Resuming run ``run_folder`` into another folder ``out``: copy its checkpoints and log there first, so that
    ``out`` holds the whole run (its best checkpoint included) and not only what is trained from now on."""
    if run_folder.resolve() == out.resolve():
        return
    for name in (LAST, BEST, LOG):
        if (run_folder / name).is_file():
            shutil.copy2(run_folder / name, out / name)


class _Run:
    """One training run: the model (wrapped for ``parallel``), optimizer, data and what it has measured."""

    def __init__(
        self,
        model_config: ModelConfig,
        tc: TrainConfig,
        data: bytes | None,
        out: str | Path | None,
        world: World,
        parallel: str,
        progress: bool,
        label: str,
        divergence_margin: float,
        context_parallel_ranks: int = 1,
        *,
        source: str | Path | None = None,
        saved: train_state.Saved | None = None,
        allow_new_data: bool = False,
    ) -> None:
        share = (1 if context_parallel_ranks > 1 else world.size) * tc.accumulate
        if tc.batch_size % share:
            raise ConfigError(
                f"batch_size={tc.batch_size} must be a multiple of ranks x accumulate = {world.size} x "
                f"{tc.accumulate} = {share}: every rank computes the same number of rows in every micro-batch"
            )
        self.tc, self.world, self.parallel, self.margin = tc, world, parallel, divergence_margin
        self.cp = _context_parallel(context_parallel_ranks, world, parallel, tc)
        self.grad_norm = math.nan
        self.micro: list[tuple] = []  # the last step's micro-batches (a divergence is diagnosed on them)
        self.progress = progress and world.main
        self.saved, self.data_changed = saved, []
        if data is not None and source is not None:
            raise ConfigError("give the training data as bytes (data) or as a path (source), not both")
        record = data_record(data, source, tc)
        if saved is not None:
            self.data_changed = _resumed_data_changes(saved, record, tc, allow_new_data)
        corpus_or_cache, self.tokenizer, model_config, notes = self._data(
            model_config, tc, data, source, Path(out) if out is not None else None, saved
        )
        self.data_record = {**record, "tokenizer": self.tokenizer.fingerprint}
        if saved is not None and saved.data["tokenizer"] != self.tokenizer.fingerprint and not self.data_changed:
            raise train_state.ResumeError(
                f"the tokenizer of the run in {saved.path.parent} is not the one it trained with (fingerprint "
                f"{saved.data['tokenizer']!r}, now {self.tokenizer.fingerprint!r}): was its {TOKENIZER_FILE} replaced?"
            )
        if self.data_changed:
            notes.append(f"data changed since the saved state (--allow-new-data): {'; '.join(self.data_changed)}")
        if world.size > 1:
            notes.append(_parallel_note(world, parallel, tc, context_parallel_ranks))
        self.model_config = model_config
        data_label = f"data {str(source)!r}" if source is not None else "the data"
        self.draw, self.make, self.val_batches = _batches(corpus_or_cache, tc, data_label)
        torch.manual_seed(tc.seed)  # the same initial weights on every rank
        plain = LanguageModel(model_config).to(world.device)
        plain.checkpoint_blocks = tc.checkpoint_activations
        plain.train()
        self.model = distributed.wrap(plain, parallel, world, precision=tc.precision)
        self.optimizer = make_optimizer(distributed.unwrapped(self.model), tc)  # after sharding: FSDP's shards
        self.gen = torch.Generator().manual_seed(tc.seed)
        self.out = Path(out) if out is not None else None
        self.checkpoint = Path(out) / LAST if out is not None else None
        self.best = Path(out) / BEST if out is not None else None
        self.result = TrainResult(model=plain, checkpoint=self.checkpoint, tokenizer=self.tokenizer)
        self.bar = Progress(tc.steps, label, enabled=self.progress)
        for note in notes:
            self.bar.log(note)
        self.tokens = 0  # the real tokens trained on so far, over all ranks (padding not counted)
        log_path = self.out / LOG if self.out is not None else Path(LOG)
        self.log = RunLog(log_path, every=tc.log_every, enabled=world.main and out is not None, device=world.device)

    def _data(
        self,
        model_config: ModelConfig,
        tc: TrainConfig,
        data: bytes | None,
        source: str | Path | None,
        out: Path | None,
        saved: train_state.Saved | None,
    ) -> tuple[bytes | TokenCache, Tokenizer, ModelConfig, list[str]]:
        """The run's corpus (bytes in memory, or a token cache), tokenizer, model config (its ``vocab_size`` set
        to a BPE tokenizer's) and notes for the log.

        Bytes without ``source``: ``data`` (default: the embedded corpus) in memory, as it always was. With a
        ``source`` (a file or folder), or with BPE (in-memory ``data`` is then written to ``CACHE_DIR/data.txt``
        to be read like a file), rank 0 builds or reuses the token cache ``out/cache/tokens.bin`` (a temporary
        folder without ``out``: then each rank builds its own), while the others wait, then open it. With BPE,
        rank 0 first trains the tokenizer on the training texts and saves it to ``out/tokenizer.json``; a
        resumed run loads the one saved in the run it resumes instead."""
        world, notes = self.world, []
        if model_config.vocab_size < corpus.BYTE_VOCAB:
            which = "the byte tokenizer, which needs" if tc.tokenizer == "bytes" else "a BPE tokenizer, which has"
            raise ConfigError(
                f"vocab_size={model_config.vocab_size} is too small for {which} >= {corpus.BYTE_VOCAB}"
                f"{' ids' if tc.tokenizer == 'bpe' else ''}"
            )
        if tc.tokenizer == "bytes" and source is None:
            return corpus.load_corpus() if data is None else data, ByteTokenizer(), model_config, notes
        shared = out is not None  # one folder for every rank: rank 0 builds, the others open
        if out is not None:
            folder = out / CACHE_DIR
        else:
            folder = Path(tempfile.mkdtemp(prefix="seqmixers-cache-"))
            weakref.finalize(self, shutil.rmtree, folder, ignore_errors=True)  # removed with the run
        if source is None:  # in-memory data with BPE: a file, read like any other
            source = folder / "data.txt"
            text = corpus.load_corpus() if data is None else data

            def write() -> None:
                if not (source.is_file() and source.stat().st_size == len(text) and source.read_bytes() == text):
                    folder.mkdir(parents=True, exist_ok=True)
                    source.write_bytes(text)  # rewritten only when it changed: an unchanged file keeps its cache

            _on_main(world, shared, "write the data", write)
        source = Path(source)
        options = cache_options(tc)
        source_files(source, fmt=options["fmt"])  # FileNotFoundError for a missing path, on every rank
        if tc.tokenizer == "bpe":
            tokenizer = self._bpe(tc, source, options, out, saved.path.parent if saved else None, shared, notes)
            V, size = model_config.vocab_size, tokenizer.vocab_size
            if V == corpus.BYTE_VOCAB and size != V:  # the byte default: the config did not choose one for BPE
                notes.append(f"vocab_size {V} -> {size}, the BPE tokenizer's size")
                model_config = dataclasses.replace(model_config, vocab_size=size)
            elif V < size:
                raise ConfigError(
                    f"vocab_size={V} in the model config is smaller than the BPE tokenizer's {size} ids "
                    f"(train.bpe_vocab={tc.bpe_vocab}): remove vocab_size from the config (it is then the "
                    f"tokenizer's), set it to {size} or more, or lower bpe_vocab"
                )
            elif V > size:
                notes.append(f"vocab_size {V} (the config's; the BPE tokenizer uses the first {size} ids)")
        else:
            tokenizer = ByteTokenizer()
        path = folder / CACHE_NAME
        build = functools.partial(build_token_cache, source, tokenizer, path, **options)
        cache = _on_main(world, shared, "build the token cache", build)
        if cache is None:
            cache = open_token_cache(path)
        if world.main:
            how = "reused" if not cache.built else f"rebuilt ({cache.damaged})" if cache.damaged else "built"
            notes.append(f"token cache {how}: {path} ({len(cache):,} tokens, {cache.n_documents:,} documents)")
        return cache, tokenizer, model_config, notes

    def _bpe(
        self,
        tc: TrainConfig,
        source: Path,
        options: dict,
        out: Path | None,
        resume: str | Path | None,
        shared: bool,
        notes: list[str],
    ) -> BPETokenizer:
        """A resumed run's saved tokenizer, or one trained (on rank 0) on ``source`` and saved to ``out``."""
        if resume is not None:
            if not (Path(resume) / TOKENIZER_FILE).is_file():
                raise ConfigError(
                    f"the run in {resume} trains with a BPE tokenizer, but {Path(resume) / TOKENIZER_FILE} is missing"
                )
            tokenizer = BPETokenizer.load(resume)
            if out is not None and self.world.main and Path(resume).resolve() != out.resolve():
                tokenizer.save(out)
            notes.append(f"BPE tokenizer: {Path(resume) / TOKENIZER_FILE} ({tokenizer.vocab_size} ids)")
            return tokenizer

        def make() -> BPETokenizer:
            trained = BPETokenizer.train(iter_texts(source, **options), tc.bpe_vocab, show_progress=self.progress)
            if out is not None:
                trained.save(out)
            return trained

        tokenizer = _on_main(self.world, shared, "train the BPE tokenizer", make)
        if tokenizer is None:
            tokenizer = BPETokenizer.load(out)
        where = f"saved to {out / TOKENIZER_FILE}" if out is not None else "not saved (no run folder)"
        notes.append(f"BPE tokenizer: trained on {source}, {tokenizer.vocab_size} ids, {where}")
        return tokenizer

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast for ``precision="bf16"`` (under FSDP, its mixed-precision policy does it instead)."""
        if self.tc.precision == "bf16" and self.parallel != "fsdp":
            return torch.autocast(self.world.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def metadata(self, step: int) -> dict:
        """What each checkpoint carries; ``read_header(path)[1]`` returns it."""
        r = self.result
        return {"step": step, "best_step": r.best_step, "best_val_loss": r.best_val_loss, "train": self.tc.to_dict()}

    def whole_model(self) -> LanguageModel | None:
        """The whole language model on rank 0 (``None`` on the others): the model itself, or under FSDP a copy
        gathered from the shards (every rank must call this then)."""
        if self.parallel != "fsdp":
            return distributed.unwrapped(self.model) if self.world.main else None
        state = distributed.full_state_dict(self.model, "fsdp")
        if not self.world.main:
            return None
        whole = LanguageModel(self.model_config)
        whole.load_state_dict(state)
        return whole

    def save(self, paths: list[Path], info: dict) -> None:
        """Write the whole model to ``paths`` from rank 0 (under FSDP every rank takes part in gathering it)."""
        whole = self.whole_model()
        for path in paths if whole is not None else ():
            whole.save(path, metadata=info)
        distributed.barrier(self.world)

    def validate(self, step: int) -> None:
        r, tc = self.result, self.tc
        with self.autocast():
            val = evaluate(self.model, self.val_batches, tc)  # every rank: the same batches, the same loss
        r.val_curve.append((step, val))
        self.log.log(step, val_loss=val, force=True, **self.measures(step))
        line = f"step {step:>5}/{tc.steps}  val loss {val:.3f}  val ppl {perplexity(val):7.2f}"
        if r.train_curve:
            line += f"  train loss {r.train_curve[-1][1]:.3f}  {self.tokens / r.train_s:,.0f} tok/s"
        self.bar.log(line)
        if not val <= r.best_val_loss + self.margin:  # NaN included
            finite = math.isfinite(val)
            why = f"is more than {self.margin} above the best" if finite else "is not finite"
            best = (
                f"best {r.best_val_loss:.3f} (step {r.best_step})" if r.best_step is not None else "none finite before"
            )
            hint = f"lower lr (now {tc.lr})" if finite else self.nonfinite_origin(self.val_batches, sharded=False)
            self.bar.close()
            message = f"training diverged at step {step}: validation loss {val:.3f} {why}; {best}; {hint}"
            raise TrainingDiverged(message, step=step, result=r)
        improved = val < r.best_val_loss
        if improved:
            r.best_step, r.best_val_loss, r.best = step, val, self.best
        if self.checkpoint is not None:
            self.save([self.checkpoint, *([self.best] if improved else [])], {"val_loss": val, **self.metadata(step)})

    def interrupt(self, signum: int, done: int) -> NoReturn:
        """Save the model and the whole training state of the last whole step, then raise: ``resume`` goes on
        from there. This is the one place that saves a run's state on the way out."""
        if self.checkpoint is not None:
            last = self.result.val_curve[-1]
            info = {**self.metadata(done), "interrupted": signal.Signals(signum).name}
            self.save([self.checkpoint], {**info, "last_val_step": last[0], "last_val_loss": last[1]})
            train_state.save(self, done)
        raise Interrupted(signum, done, self.checkpoint)

    def step(self, step: int) -> float:
        """One optimizer step on the global batch; returns its loss (the same on every rank)."""
        tc, world, model = self.tc, self.world, self.model
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(step - 1, tc)
        cp = self.cp
        data_world = World() if cp is not None else world  # under context parallelism every rank takes every row
        micro = [self.make(rows) for rows in micro_batches(self.draw(self.gen), tc.accumulate, data_world)]
        if cp is not None:  # ... and its own part of their time: tokens [r L, (r+1) L)
            micro = [(cp.shard(x), cp.shard(y), cu, n) for x, y, cu, n in micro]
        self.micro = micro  # what a divergence is diagnosed on
        # The loss is the mean over the global batch's counted targets: each micro-batch's sum over that count
        # (not a mean per micro-batch, which would weigh a micro-batch of few targets as much as a full one),
        # times the data-parallel ranks, whose gradients DDP and FSDP average (context-parallel ranks' are summed).
        counted = distributed.all_sum(sum(int((y != corpus.IGNORE).sum()) for _, y, _, _ in micro), world)
        scale = data_world.size / counted
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for m, (x, y, cu_seqlens, _) in enumerate(micro):
            x, y = x.to(world.device), y.to(world.device)
            cu_seqlens = cu_seqlens.to(world.device) if cu_seqlens is not None else None
            with _sync_gradients(model, self.parallel, last=m == len(micro) - 1), self.context():
                with self.autocast():  # the forward pass only: backward runs in the forward's dtypes
                    logits, _ = model(x, mode=tc.mode, chunk_size=tc.chunk_size, cu_seqlens=cu_seqlens)  # (B, T, V)
                loss_sum = F.cross_entropy(
                    logits.flatten(0, 1).float(), y.flatten(), ignore_index=corpus.IGNORE, reduction="sum"
                )
                (loss_sum * scale).backward()
            total += loss_sum.item()
        if cp is not None:
            reduce_gradients(model, cp.group)
        # The norm of the whole gradient (FSDP's clip_grad_norm_ reduces it over the shards); inf: measured only.
        self.grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip or math.inf))
        self.optimizer.step()
        real = sum(n for *_, n in micro)
        total, real_everywhere = distributed.all_sums([total, real], world)
        self.tokens += real if cp is not None else int(real_everywhere)  # context-parallel ranks share their rows
        return total / counted

    def nonfinite_origin(self, batches: list[tuple], *, sharded: bool) -> str:
        """Where a non-finite loss came from, for the divergence message: the first parameter that is not finite,
        or else the first layer (and the backend its mixer runs on) whose output is not finite on ``batches``
        (``(x, y)`` or ``(x, y, cu_seqlens or None, ...)``; ``sharded``: cut for context parallelism, as in
        ``step``). Every rank runs the same forward passes (FSDP and context parallelism need them all)."""
        tc, plain = self.tc, distributed.unwrapped(self.model)
        for name, param in plain.named_parameters():
            if not bool(torch.isfinite(param).all()):
                return f"the weight {name} is not finite (an update made it so); lower lr (now {tc.lr})"
        found: list[str] = []

        def watch(label: str) -> Callable:
            def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
                y = output[0] if isinstance(output, tuple) else output
                if not found and isinstance(y, torch.Tensor) and not bool(torch.isfinite(y).all()):
                    found.append(label)

            return hook

        handles = [plain.tok_emb.register_forward_hook(watch("the embedding"))]
        for i, block in enumerate(plain.blocks):
            handles.append(block.mixer.register_forward_hook(watch(f"layer {i}'s mixer {self._mixer_name(i)}")))
            handles.append(block.ffn.register_forward_hook(watch(f"layer {i}'s FFN")))
        try:
            with torch.no_grad(), self.autocast(), self.context() if sharded else contextlib.nullcontext():
                for x, _, *packed in batches:
                    cu_seqlens = packed[0].to(self.world.device) if packed and packed[0] is not None else None
                    self.model(x.to(self.world.device), mode=tc.mode, chunk_size=tc.chunk_size, cu_seqlens=cu_seqlens)
        finally:
            for handle in handles:
                handle.remove()
        if found:
            return f"the first non-finite output is {found[0]}, whose inputs were finite"
        return f"every layer's output is finite: the loss or the backward pass is not; lower lr (now {tc.lr})"

    def _mixer_name(self, layer: int) -> str:
        """``'retention' (backend 'torch' of plugin ...)``: the mixer of ``layer`` and the backends it runs on."""
        mixer = distributed.unwrapped(self.model).blocks[layer].mixer
        spec = self.model_config.layer_specs()[layer].mixer
        registry, dtype = get_registry(), torch.bfloat16 if self.tc.precision == "bf16" else torch.float32
        backends = []
        for op in getattr(mixer, "ops", ()):
            try:
                chosen = registry.resolve_backend(
                    op, mixer.backend, device=self.world.device, dtype=dtype, mode=self.tc.mode
                )
                backends.append(registry.describe_backend(chosen))
            except (KeyError, ValueError, RuntimeError):
                backends.append(f"backend {mixer.backend!r} of op {op!r}")
        return f"{spec!r} ({'; '.join(backends) or 'no registered op'})"

    def measures(self, step: int) -> dict[str, float | None]:
        """What the run log records at ``step`` besides a validation loss."""
        r = self.result
        return {
            "loss": r.train_curve[-1][1] if r.train_curve and r.train_curve[-1][0] == step else None,
            "lr": lr_at(step - 1, self.tc) if step else None,
            "tokens_per_s": self.tokens / r.train_s if r.train_s else None,
            "grad_norm": self.grad_norm if step else None,
        }

    def context(self) -> contextlib.AbstractContextManager:
        """Context parallelism over the ranks while the model runs (nothing without it)."""
        return context_parallel(self.cp.group, model=self.model) if self.cp is not None else contextlib.nullcontext()

    def stop_requested(self, stop: _StopSignals) -> int | None:
        """The signal that asks the run to stop, agreed by every rank (a rank that stops alone would hang the
        others' next collective)."""
        if self.world.size == 1:
            return stop.signum
        agreed = distributed.all_sum(stop.signum or 0, self.world)
        return stop.signum or (int(agreed) if agreed else None)

    def loop(self, stop: _StopSignals) -> TrainResult:
        tc, r = self.tc, self.result
        if self.saved is None and self.log.enabled:
            self.log.path.unlink(missing_ok=True)  # a new run's log (a resumed one appends)
        if self.saved is not None:
            done = train_state.load(self, self.saved)
            self.bar.log(f"resumed {self.saved.path.parent} after step {done}")
            if self.data_changed and r.best_step is not None:  # its validation measured other data
                self.bar.log(f"best so far forgotten (step {r.best_step}, val loss {r.best_val_loss:.3f}): other data")
                r.best, r.best_step, r.best_val_loss = None, None, math.inf
        else:
            done = 0
            self.validate(0)
        for step in range(done + 1, tc.steps + 1):
            signum = self.stop_requested(stop)
            if signum is not None:
                self.bar.close()
                self.interrupt(signum, step - 1)
            t0 = time.perf_counter()
            loss_value = self.step(step)
            if not math.isfinite(loss_value):
                origin = self.nonfinite_origin(self.micro, sharded=True)
                self.bar.close()
                raise TrainingDiverged(
                    f"training diverged at step {step}: loss {loss_value}; {origin}", step=step, result=r
                )
            r.train_s += time.perf_counter() - t0
            r.train_curve.append((step, loss_value))
            self.bar.update(step, f"loss {loss_value:.3f} {self.tokens / r.train_s:,.0f} tok/s")
            self.log.log(step, **self.measures(step))
            if step % tc.eval_every == 0 or step == tc.steps:
                self.validate(step)
            if self.out is not None and tc.save_every and step % tc.save_every == 0:
                train_state.save(self, step)
        self.bar.close()
        self.log.close()
        stop.release()  # from here (the sample), Ctrl-C interrupts at once: the last checkpoint is saved
        if stop.signum is not None:
            raise Interrupted(stop.signum, tc.steps, self.checkpoint)
        r.tokens_per_s = self.tokens / r.train_s
        if self.parallel == "fsdp":  # the result holds the whole model (on rank 0)
            r.model = self.whole_model() or r.model
        if tc.sample_tokens and self.world.main:
            tok = self.tokenizer
            prompt = torch.tensor(tok.encode(tc.sample_prompt or "\n"), dtype=torch.long)  # bytes: corpus.encode
            out_tokens = r.model.generate(
                prompt, tc.sample_tokens, temperature=tc.temperature, top_k=tc.top_k, seed=tc.seed
            )  # (T + new,)
            r.sample = tok.decode(out_tokens)
        r.model.eval()
        return r


@contextlib.contextmanager
def _sync_gradients(model: torch.nn.Module, parallel: str, *, last: bool) -> Iterator[None]:
    """Reduce gradients over the ranks only in the last micro-batch's backward pass (the others accumulate)."""
    if last or parallel == "none":
        yield
    elif parallel == "ddp":
        with model.no_sync():
            yield
    else:  # FSDP2
        model.set_requires_gradient_sync(False, recurse=True)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True, recurse=True)
