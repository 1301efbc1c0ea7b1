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
"""

from __future__ import annotations

import contextlib
import json
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from models import distributed
from models.config import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from models.train import _Run

STATE = "train_state"
FORMAT = 1


class ResumeError(ConfigError):
    """A training state that this run cannot continue (missing, unreadable, or from another setup)."""


def where(folder: str | Path) -> Path | None:
    """The complete training state in run folder ``folder`` (or ``folder`` itself if it is one), if any."""
    folder = Path(folder)
    for path in (folder, folder / STATE, folder / f"{STATE}.old"):
        if (path / "meta.json").is_file():
            return path
    return None


@contextlib.contextmanager
def _one_process_is_intended() -> Iterator[None]:
    """``torch.distributed.checkpoint`` warns that it assumes one process when no group is set up: here it is."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _rng(run: _Run) -> dict[str, torch.Tensor]:
    """This rank's random states (keys carry the rank: every rank has its own) and the shared data generator."""
    r = run.world.rank
    states = {f"torch.{r}": torch.get_rng_state(), "data": run.gen.get_state()}
    if run.world.device.type == "cuda":
        states[f"cuda.{r}"] = torch.cuda.get_rng_state(run.world.device)
    return states


def save(run: _Run, step: int) -> Path:
    """Save ``run``'s state after ``step`` to ``OUT/train_state`` (every rank takes part); return the folder."""
    assert run.out is not None
    final, tmp, old = run.out / STATE, run.out / f"{STATE}.tmp", run.out / f"{STATE}.old"
    if run.world.main:
        shutil.rmtree(tmp, ignore_errors=True)
    distributed.barrier(run.world)
    model_state, optim_state = get_state_dict(run.model, run.optimizer)
    state = {"model": model_state, "optim": optim_state, "rng": _rng(run)}
    with _one_process_is_intended():
        dcp.save(state, checkpoint_id=tmp, no_dist=run.world.size == 1)
    if run.world.main:
        r = run.result
        meta = {
            "format": FORMAT,
            "step": step,
            "ranks": run.world.size,
            "parallel": run.parallel,
            "model": run.model_config.to_dict(),
            "train": run.tc.to_dict(),
            "train_curve": r.train_curve,
            "val_curve": r.val_curve,
            "best_step": r.best_step,
            "best_val_loss": r.best_val_loss if r.best_step is not None else None,
            "tokens": run.tokens,
            "train_s": r.train_s,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    distributed.barrier(run.world)
    return final


def read_meta(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ResumeError(f"cannot read the training state in {path}: {exc}") from exc


def load(run: _Run, folder: str | Path) -> int:
    """Restore ``run`` from the training state in ``folder``; return the step it had completed."""
    path = where(folder)
    if path is None:
        raise ResumeError(
            f"no training state in {folder}: expected {Path(folder) / STATE}/meta.json (written every --save-every "
            f"steps and when a run is interrupted)"
        )
    meta = read_meta(path)
    mismatches = [
        f"{what}: saved {saved!r}, now {now!r}"
        for what, saved, now in (
            ("ranks", meta.get("ranks"), run.world.size),
            ("parallel", meta.get("parallel"), run.parallel),
            ("model", meta.get("model"), run.model_config.to_dict()),
        )
        if saved != now
    ]
    if mismatches:
        raise ResumeError(f"the training state in {path} is from another setup: {'; '.join(mismatches)}")
    model_state, optim_state = get_state_dict(run.model, run.optimizer)
    state = {"model": model_state, "optim": optim_state, "rng": _rng(run)}
    with _one_process_is_intended():
        dcp.load(state, checkpoint_id=path, no_dist=run.world.size == 1)
    set_state_dict(run.model, run.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng, r = state["rng"], run.world.rank
    torch.set_rng_state(rng[f"torch.{r}"])
    run.gen.set_state(rng["data"])
    if f"cuda.{r}" in rng:
        torch.cuda.set_rng_state(rng[f"cuda.{r}"], run.world.device)
    res = run.result
    res.train_curve = [tuple(p) for p in meta["train_curve"]]
    res.val_curve = [tuple(p) for p in meta["val_curve"]]
    res.best_step = meta["best_step"]
    if res.best_step is not None:
        res.best_val_loss, res.best = meta["best_val_loss"], run.best
    run.tokens, res.train_s = meta["tokens"], meta["train_s"]
    return int(meta["step"])


def export(folder: str | Path, path: str | Path) -> Path:
    """Write the model of the training state in ``folder`` (sharded or not) to the single-file checkpoint
    ``path`` that ``generate`` and ``models.load`` read; needs no process group."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from models.config import ModelConfig
    from models.lm import LanguageModel  # (imported here: models.lm is not needed to save or load a state)

    source = where(folder)
    if source is None:
        raise ResumeError(f"no training state in {folder}: expected {Path(folder) / STATE}/meta.json")
    meta, path = read_meta(source), Path(path)
    whole = path.with_name(f".{path.name}.full.tmp")
    try:
        dcp_to_torch_save(source, whole)
        weights = torch.load(whole, weights_only=True)["model"]
    finally:
        whole.unlink(missing_ok=True)
    model = LanguageModel(ModelConfig.from_dict(meta["model"]))
    model.load_state_dict(weights)
    return model.save(path, metadata={"step": meta["step"], "exported_from": str(source), "train": meta["train"]})
