"""A run folder: what a run writes there, the lock held while it does, and what it finds there.

``OUT/model.safetensors`` is the last validated model (or, after SIGINT/SIGTERM, the model of the last completed
step), ``OUT/best.safetensors`` the one of the lowest validation loss, ``OUT/log.jsonl`` the run log (and
``curves.png`` its plot), ``OUT/cache/`` the token cache, ``OUT/tokenizer.json`` a BPE tokenizer and
``OUT/train_state/`` the whole training state (``models.training.state``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from models.checkpoint import read_header
from models.checkpoint_format import remove_stale_temporaries
from models.config import ConfigError
from models.training.parallel import World, on_main
from models.training.state import STATE
from models.training.tokenizers import TOKENIZER_FILE

try:
    import fcntl
except ImportError:  # pragma: no cover (Windows: no advisory locks; a run folder is then not locked)
    fcntl = None

LAST, BEST = "model.safetensors", "best.safetensors"  # the run folder's checkpoints
LOG, CURVES = "log.jsonl", "curves.png"  # the run log (rank 0) and its plot (by the command, at the end)
CACHE_DIR, CACHE_NAME = "cache", "tokens.bin"  # the token cache: OUT/cache/tokens.bin
LOCK = ".lock"  # who holds the folder, while a run trains into it


def checkpoints(out: str | Path) -> list[str]:
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


class RunLocked(ConfigError):
    """Another process is training into the same run folder."""


@contextlib.contextmanager
def lock(out: Path | None, world: World) -> Iterator[None]:
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

    handle = on_main(world, True, "lock the run folder", take)
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
    shutil.rmtree(out / f"{STATE}.tmp", ignore_errors=True)  # the lock: no save is under way


def carry_over(run_folder: Path, out: Path) -> None:
    """Resuming run ``run_folder`` into another folder ``out``: copy its checkpoints and log there first, so that
    ``out`` holds the whole run (its best checkpoint included) and not only what is trained from now on."""
    if run_folder.resolve() == out.resolve():
        return
    for name in (LAST, BEST, LOG):
        if (run_folder / name).is_file():
            shutil.copy2(run_folder / name, out / name)
