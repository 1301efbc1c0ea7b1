"""The whole state of a training run, saved with ``torch.distributed.checkpoint`` so that a run can resume.

``OUT/train_state/`` holds what a run needs to go on exactly where it stopped:

- the model and the optimizer (through ``torch.distributed.checkpoint.state_dict``: whole tensors in one
  process or under DDP, each rank's shards under FSDP, which every rank writes and reads in parallel);
- every rank's torch RNG (and CUDA RNG) and the data generator, which fixes the batches still to come;
- ``meta.json``: the step, the curves, the best validation so far, the tokens and seconds counted, the
  configs, the number of ranks and the parallelism.

The learning-rate schedule is a function of the step, so the step restores it. A save goes to a temporary
folder that replaces the previous one only once complete (the previous one is kept as ``train_state.old``
until then), so a run killed in the middle of a save still has a whole state to resume from.

``checksums.json`` holds the size and SHA-256 of every other file of the state, written last; ``read`` checks
them and every field of ``meta.json`` before anything is loaded, so a flipped byte, a truncated shard or a
missing file is refused by name instead of being trained on. Hashing reads the state once more on save and on
resume (``benchmarks/results/train_state_checksums.json`` has the cost).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from models.config import PARALLEL, ConfigError, ModelConfig, TrainConfig
from models.lm import LanguageModel
from models.training.parallel import World, barrier

STATE = "train_state"
FORMAT = 2  # 2: checksums.json, and the data the run trains on in meta.json
META, CHECKSUMS = "meta.json", "checksums.json"
_BLOCK = 1 << 20


class ResumeError(ConfigError):
    """A training state that this run cannot continue (missing, damaged, or from another setup or data)."""


def where(folder: str | Path) -> Path | None:
    """The complete training state in run folder ``folder`` (or ``folder`` itself if it is one), if any."""
    folder = Path(folder)
    for path in (folder, folder / STATE, folder / f"{STATE}.old"):
        if (path / META).is_file():
            return path
    return None


@contextlib.contextmanager
def _one_process_is_intended() -> Iterator[None]:
    """``torch.distributed.checkpoint`` warns that it assumes one process when no group is set up: here it is."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


@dataclass
class TrainState:
    """A run after ``step`` steps: the model (wrapped for its parallelism) and its optimizer, the data generator
    (which fixes the batches still to come) and what the run has measured. ``save`` writes it, with every rank's
    random state; ``restore`` gives it back."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    step: int = 0
    train_curve: list[tuple[int, float]] = field(default_factory=list)  # (step, training loss)
    val_curve: list[tuple[int, float]] = field(default_factory=list)  # (step, validation loss)
    best_step: int | None = None  # the step of the lowest validation loss so far
    best_val_loss: float = math.inf
    tokens: int = 0  # the real tokens trained on so far, over all ranks (padding not counted)
    train_s: float = 0.0  # seconds spent in training steps


def _rng(state: TrainState, world: World) -> dict[str, torch.Tensor]:
    """This rank's random states (keys carry the rank: every rank has its own) and the shared data generator."""
    r = world.rank
    states = {f"torch.{r}": torch.get_rng_state(), "data": state.generator.get_state()}
    if world.device.type == "cuda":
        states[f"cuda.{r}"] = torch.cuda.get_rng_state(world.device)
    return states


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, read in blocks (a shard may not fit in memory twice)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def write_checksums(folder: Path) -> None:
    """Record the size and SHA-256 of every file in ``folder`` (written last: a state without it is incomplete)."""
    files = {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": file_sha256(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != CHECKSUMS
    }
    (folder / CHECKSUMS).write_text(json.dumps({"algorithm": "sha256", "files": files}, indent=1))


def verify_checksums(path: Path) -> None:
    """Raise ``ResumeError`` naming the first file of the state in ``path`` that is missing, of another size or
    whose bytes differ from what was saved."""
    try:
        listed = json.loads((path / CHECKSUMS).read_text())["files"]
        entries = [(str(name), int(e["size"]), str(e["sha256"])) for name, e in listed.items()]
    except FileNotFoundError:
        raise ResumeError(
            f"the training state in {path} has no {CHECKSUMS}, so it cannot be checked: it was saved by seqmixers "
            f"0.2 or its save did not finish; start a new run (the run folder's model.safetensors keeps its last model)"
        ) from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ResumeError(
            f"the training state in {path} is damaged: {path / CHECKSUMS} is unreadable ({exc})"
        ) from None
    names = {name for name, _, _ in entries}
    for required in (META, ".metadata"):
        if required not in names:
            raise ResumeError(f"the training state in {path} is damaged: {path / CHECKSUMS} does not list {required}")
    for name, size, digest in entries:
        file = path / name
        if not file.is_file():
            raise ResumeError(f"the training state in {path} is damaged: {file} is missing")
        if (actual := file.stat().st_size) != size:
            raise ResumeError(
                f"the training state in {path} is damaged: {file} holds {actual:,} bytes, {size:,} were saved"
            )
        if file_sha256(file) != digest:
            raise ResumeError(
                f"the training state in {path} is damaged: the bytes of {file} differ from those saved (checksum)"
            )


def save(
    state: TrainState, out: Path, world: World, *, parallel: str, model: ModelConfig, train: TrainConfig, data: dict
) -> Path:
    """Save ``state`` to ``out/train_state`` (every rank takes part) with what the run is: its parallelism, configs
    and the record of its data (``models.training.batches.data_record``); return the folder."""
    final, tmp, old = out / STATE, out / f"{STATE}.tmp", out / f"{STATE}.old"
    if world.main:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier(world)
    model_state, optim_state = get_state_dict(state.model, state.optimizer)
    tensors = {"model": model_state, "optim": optim_state, "rng": _rng(state, world)}
    with _one_process_is_intended():
        dcp.save(tensors, checkpoint_id=tmp, no_dist=world.size == 1)
    barrier(world)  # every rank's shards are written before rank 0 hashes them
    if world.main:
        meta = {
            "format": FORMAT,
            "step": state.step,
            "ranks": world.size,
            "parallel": parallel,
            "model": model.to_dict(),
            "train": train.to_dict(),
            "data": data,
            "train_curve": state.train_curve,
            "val_curve": state.val_curve,
            "best_step": state.best_step,
            "best_val_loss": state.best_val_loss if state.best_step is not None else None,
            "tokens": state.tokens,
            "train_s": state.train_s,
        }
        (tmp / META).write_text(json.dumps(meta, indent=1))
        write_checksums(tmp)
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    barrier(world)
    return final


def read_meta(path: Path) -> dict[str, Any]:
    """``meta.json`` of the state in ``path`` as saved (unchecked: ``read`` checks it)."""
    try:
        return json.loads((path / META).read_text())
    except (OSError, ValueError) as exc:
        raise ResumeError(f"cannot read the training state in {path}: {exc}") from exc


@dataclass(frozen=True)
class Saved:
    """A training state that passed its checks: its folder, its ``meta.json`` and the configs in it."""

    path: Path
    meta: dict[str, Any]
    model: ModelConfig
    train: TrainConfig

    @property
    def step(self) -> int:
        return self.meta["step"]

    @property
    def data(self) -> dict[str, Any]:
        return self.meta["data"]


def read(folder: str | Path) -> Saved:
    """The training state in run folder ``folder``, its files checked against their checksums and its
    ``meta.json`` field by field; ``ResumeError`` names what is missing or damaged."""
    path = where(folder)
    if path is None:
        raise ResumeError(
            f"no training state in {folder}: expected {Path(folder) / STATE}/{META} (written every --save-every "
            f"steps and when a run is interrupted)"
        )
    verify_checksums(path)
    meta = read_meta(path)
    try:
        model, train = check_meta(meta)
    except (ConfigError, TypeError, ValueError) as exc:
        raise ResumeError(f"the training state in {path} is damaged: {META}: {exc}") from None
    return Saved(path, meta, model, train)


def _got(value: object) -> str:
    return f"{value!r} ({type(value).__name__})"


def _is_int(value: object, lo: int, hi: float = math.inf) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def _is_number(value: object, lo: float = -math.inf) -> bool:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return number and math.isfinite(value) and value >= lo


def _check_curve(name: str, curve: object, first: int, last: int) -> dict[int, float]:
    """A curve is a list of [step, loss] with steps rising strictly within [first, last] and finite losses."""
    if not isinstance(curve, list):
        raise ConfigError(f"{name} must be a list of [step, loss], got {_got(curve)}")
    points, previous = {}, first - 1
    for point in curve:
        if not (isinstance(point, list) and len(point) == 2):
            raise ConfigError(f"{name} must hold [step, loss] pairs, got {_got(point)}")
        step, loss = point
        if not _is_int(step, previous + 1, last):
            raise ConfigError(f"{name}: steps must rise within [{first}, {last}], got {step!r} after {previous}")
        if not _is_number(loss):
            raise ConfigError(f"{name}: the loss at step {step} must be a finite number, got {_got(loss)}")
        points[step], previous = float(loss), step
    return points


def check_data_record(record: object) -> None:
    """What a run trained on (``models.training.batches.data_record``): its kind, fingerprint and tokenizer."""
    if not isinstance(record, dict):
        raise ConfigError(f"data must be a table, got {_got(record)}")
    kind = record.get("kind")
    keys = {"embedded": {"sha256", "bytes"}, "bytes": {"sha256", "bytes"}, "path": {"path", "files"}}
    if kind not in keys:
        raise ConfigError(f"data.kind must be one of {sorted(keys)}, got {_got(kind)}")
    want = {"kind", "tokenizer", *keys[kind]}
    if set(record) != want:
        raise ConfigError(f"data must hold the fields {sorted(want)}, got {sorted(record)}")
    if not isinstance(record["tokenizer"], str):
        raise ConfigError(f"data.tokenizer must be a tokenizer's fingerprint (str), got {_got(record['tokenizer'])}")
    if kind != "path":
        if not (isinstance(record["sha256"], str) and len(record["sha256"]) == 64):
            raise ConfigError(f"data.sha256 must be a hex SHA-256, got {_got(record['sha256'])}")
        if not _is_int(record["bytes"], 0):
            raise ConfigError(f"data.bytes must be an int >= 0, got {_got(record['bytes'])}")
        return
    if not isinstance(record["path"], str) or not record["path"]:
        raise ConfigError(f"data.path must be a path, got {_got(record['path'])}")
    files = record["files"]
    if not isinstance(files, list) or not files:
        raise ConfigError(f"data.files must be a non-empty list, got {_got(files)}")
    for f in files:
        ok = isinstance(f, dict) and set(f) == {"path", "size", "mtime_ns"} and isinstance(f["path"], str)
        if not (ok and _is_int(f["size"], 0) and _is_int(f["mtime_ns"], 0)):
            raise ConfigError(f"data.files must hold {{path, size, mtime_ns}} entries, got {_got(f)}")


FIELDS = (
    "format", "step", "ranks", "parallel", "model", "train", "data", "train_curve", "val_curve", "best_step",
    "best_val_loss", "tokens", "train_s",
)  # fmt: skip


def check_meta(meta: object) -> tuple[ModelConfig, TrainConfig]:
    """Check every field of a ``meta.json`` (its type and range, and that the fields agree with each other);
    return its configs. Raises ``ConfigError`` naming the first field that is wrong."""
    if not isinstance(meta, dict):
        raise ConfigError(f"expected a table of fields, got {_got(meta)}")
    if meta.get("format") != FORMAT:
        raise ConfigError(f"format must be {FORMAT}, got {_got(meta.get('format'))}")
    if set(meta) != set(FIELDS):
        missing, extra = sorted(set(FIELDS) - set(meta)), sorted(set(meta) - set(FIELDS))
        raise ConfigError(f"expected the fields {list(FIELDS)}; missing {missing}, unknown {extra}")
    model = ModelConfig.from_dict(meta["model"]) if isinstance(meta["model"], dict) else None
    train = TrainConfig.from_dict(meta["train"]) if isinstance(meta["train"], dict) else None
    if model is None or train is None:
        raise ConfigError(f"model and train must be tables, got {_got(meta['model'])} and {_got(meta['train'])}")
    step = meta["step"]
    if not _is_int(step, 0, train.steps):
        raise ConfigError(f"step must be an int in [0, train.steps = {train.steps}], got {_got(step)}")
    if not _is_int(meta["ranks"], 1):
        raise ConfigError(f"ranks must be an int >= 1, got {_got(meta['ranks'])}")
    if meta["parallel"] not in PARALLEL:
        raise ConfigError(f"parallel must be one of {PARALLEL}, got {_got(meta['parallel'])}")
    check_data_record(meta["data"])
    train_points = _check_curve("train_curve", meta["train_curve"], 1, step)
    if len(train_points) != step:
        raise ConfigError(f"train_curve must hold one loss per step done ({step}), got {len(train_points)}")
    val_points = _check_curve("val_curve", meta["val_curve"], 0, step)
    if 0 not in val_points:
        raise ConfigError("val_curve must start at step 0 (the validation before training)")
    best_step, best = meta["best_step"], meta["best_val_loss"]
    if best_step is None:
        if best is not None:
            raise ConfigError(f"best_val_loss must be null when best_step is, got {_got(best)}")
    elif not (_is_int(best_step, 0, step) and best_step in val_points and best == val_points[best_step]):
        raise ConfigError(
            f"best_step and best_val_loss must name a point of val_curve, got {_got(best_step)}, {_got(best)}"
        )
    if not _is_int(meta["tokens"], 0):
        raise ConfigError(f"tokens must be an int >= 0, got {_got(meta['tokens'])}")
    if not _is_number(meta["train_s"], 0.0):
        raise ConfigError(f"train_s must be a finite number >= 0, got {_got(meta['train_s'])}")
    return model, train


def restore(saved: Saved, state: TrainState, world: World, *, parallel: str, model: ModelConfig) -> TrainState:
    """``state`` (a new run's: its model, optimizer and generator) as the checked training state ``saved`` left
    it: the tensors and random states loaded in place, the step and measures from its ``meta.json``. A state
    saved by another setup (ranks, parallelism, model) is refused."""
    meta, path = saved.meta, saved.path
    mismatches = [
        f"{what}: saved {was!r}, now {now!r}"
        for what, was, now in (
            ("ranks", meta["ranks"], world.size),
            ("parallel", meta["parallel"], parallel),
            ("model", meta["model"], model.to_dict()),
        )
        if was != now
    ]
    if mismatches:
        raise ResumeError(f"the training state in {path} is from another setup: {'; '.join(mismatches)}")
    model_state, optim_state = get_state_dict(state.model, state.optimizer)
    tensors = {"model": model_state, "optim": optim_state, "rng": _rng(state, world)}
    with _one_process_is_intended():
        dcp.load(tensors, checkpoint_id=path, no_dist=world.size == 1)
    set_state_dict(state.model, state.optimizer, model_state_dict=tensors["model"], optim_state_dict=tensors["optim"])
    rng, r = tensors["rng"], world.rank
    torch.set_rng_state(rng[f"torch.{r}"])
    state.generator.set_state(rng["data"])
    if f"cuda.{r}" in rng:
        torch.cuda.set_rng_state(rng[f"cuda.{r}"], world.device)
    best_step = meta["best_step"]
    return dataclasses.replace(
        state,
        step=saved.step,
        train_curve=[tuple(p) for p in meta["train_curve"]],
        val_curve=[tuple(p) for p in meta["val_curve"]],
        best_step=best_step,
        best_val_loss=meta["best_val_loss"] if best_step is not None else math.inf,
        tokens=meta["tokens"],
        train_s=meta["train_s"],
    )


def export(folder: str | Path, path: str | Path) -> Path:
    """Write the model of the training state in ``folder`` (sharded or not) to the single-file checkpoint
    ``path`` that ``generate`` and ``models.load`` read; needs no process group. The state is checked first."""
    saved, path = read(folder), Path(path)
    whole = path.with_name(f".{path.name}.full.tmp")
    try:
        dcp_to_torch_save(saved.path, whole)
        weights = torch.load(whole, weights_only=True)["model"]
    finally:
        whole.unlink(missing_ok=True)
    model = LanguageModel(saved.model)
    model.load_state_dict(weights)
    info = {"step": saved.step, "exported_from": str(saved.path), "train": saved.meta["train"]}
    return model.save(path, metadata=info)
