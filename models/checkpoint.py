"""Reading checkpoints: ``load`` (the model) and ``read_header`` (its config and metadata).

A checkpoint is one safetensors file with the model config as JSON in its header (``models.checkpoint_format``,
which ``LanguageModel.save`` writes). Loading never unpickles: the header is JSON and the tensors are raw bytes.
Both checksums are checked; a truncated, foreign or mismatched file raises ``CheckpointError`` naming the file
and what is wrong (a path that is not a regular file, an ``OSError`` saying what it is). The config is checked
against the tensors' names and shapes before a model is built, so a crafted header costs nothing; each tensor
keeps its dtype. Files of every earlier format version still load.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from models.checkpoint_format import (
    FORMAT,
    FORMAT_VERSION,
    HEADER_CHECKSUM_SINCE,
    CheckpointError,
    checksum,
    header_checksum,
    misfit,
    mismatch,
)
from models.config import ConfigError, ModelConfig
from models.lm import LanguageModel

# Config fields added after format version 1, with the value that reproduces what a version-1 model computed
# (a v1 file has no such key, and the field's new default would silently make it a different model).
V1_DEFAULTS = {"init": "gpt2"}
HEADER_LIMIT = 100_000_000  # safetensors' own limit on the JSON header


def _check_depth_and_embedding(config: ModelConfig, shapes: Mapping[str, tuple[int, ...]], where: str) -> None:
    """Refuse at once a config that cannot be that of tensors of ``shapes``: the number of layers their names
    imply, and the embedding's shape. Checked before anything is built: a crafted ``n_layers = 100000`` would cost
    minutes of building, a ``vocab_size = 1e12`` an allocation failure. What these do not cover is checked
    against a model built on the meta device, whose size the tensors then bound."""
    layers = {int(m.group(1)) for name in shapes if (m := re.match(r"blocks\.([0-9]+)\.", name))}
    if len(layers) != config.n_layers:
        raise CheckpointError(
            f"{where}: its weights do not fit its config; n_layers={config.n_layers}, but its tensors are those "
            f"of {len(layers)} layers"
        )
    embedding = (config.vocab_size, config.d_model)
    problem = misfit(
        {k: shapes[k] for k in ("tok_emb.weight", "lm_head.weight") if k in shapes},
        {k: embedding for k in ("tok_emb.weight", "lm_head.weight") if k in shapes or k == "tok_emb.weight"},
    )
    if problem is not None:
        raise CheckpointError(f"{where}: {problem}")


_FILE_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"))


def _check_file(path: Path, where: str) -> None:
    """Raise an ``OSError`` saying what ``path`` is when it is not a regular file (a FIFO is never opened: its
    read would wait for a writer forever)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        dangling = f" (a symbolic link to {os.readlink(path)!r}, which does not exist)" if path.is_symlink() else ""
        raise FileNotFoundError(f"{where} does not exist{dangling}") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(f"{where} is a symbolic link loop (following it never reaches a file)") from None
        raise OSError(f"{where} cannot be read: {exc.strerror or exc}") from None
    if stat.S_ISDIR(mode):
        inside = path / "model.safetensors"
        hint = f" (the checkpoint of a run folder is {str(inside)!r})" if inside.is_file() else ""
        raise IsADirectoryError(f"{where} is a directory, not a checkpoint file{hint}")
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _FILE_KINDS if test(mode)), "a block device or another special file")
        raise OSError(f"{where} is not a regular file ({kind})")


def _read(path: Path) -> tuple[bytes, dict[str, str]]:
    """The file's bytes and its header metadata, checked to be a seqmixers checkpoint."""
    where = f"checkpoint {str(path)!r}"
    _check_file(path, where)
    data = path.read_bytes()
    if len(data) < 8:
        raise CheckpointError(f"{where} is truncated or not a safetensors file: it holds only {len(data)} bytes")
    (n,) = struct.unpack("<Q", data[:8])
    if n > HEADER_LIMIT or 8 + n > len(data):
        raise CheckpointError(
            f"{where} is truncated or not a safetensors file: its header claims {n} bytes, "
            f"but the file holds {len(data) - 8} after the length field"
        )
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{where} has a corrupt header (not JSON): {exc}") from exc
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{where} is a safetensors file but not a seqmixers checkpoint: its metadata has no "
            f"format={FORMAT!r} (save one with model.save(path))"
        )
    version = meta.get("format_version", "")
    if not isinstance(version, str) or not re.fullmatch(r"[0-9]+", version):  # str.isdigit() also takes "²"
        raise CheckpointError(
            f"{where} has a corrupt header: format_version must be a whole number written as a string, got {version!r}"
        )
    if int(version) > FORMAT_VERSION:
        raise CheckpointError(
            f"{where} has format version {version!r}; this seqmixers reads versions up to {FORMAT_VERSION}"
        )
    if int(version) >= HEADER_CHECKSUM_SINCE:
        if "header_sha256" not in meta:
            raise CheckpointError(
                f"{where} is corrupt: it has no header checksum (header_sha256), which format version "
                f"{HEADER_CHECKSUM_SINCE} and later always write"
            )
        if meta["header_sha256"] != header_checksum(meta):
            raise CheckpointError(
                f"{where} is corrupt: its header does not match the checksum saved with it (config or metadata "
                "changed after it was written)"
            )
    return data, meta


def _config(meta: Mapping[str, str], where: str) -> ModelConfig:
    try:
        fields = json.loads(meta["config"])
        if int(meta["format_version"]) < 2 and isinstance(fields, dict):
            fields = {**V1_DEFAULTS, **fields}
        return ModelConfig.from_dict(fields)
    except (KeyError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{where} has a missing or corrupt config in its header: {exc}") from exc
    except ConfigError as exc:
        raise CheckpointError(f"{where} holds a config this installation cannot build: {exc}") from exc


def read_header(path: str | Path) -> tuple[ModelConfig, dict[str, Any]]:
    """The config and the saved metadata (``info``) of a checkpoint, without building the model and without
    loading any plugin: a header whose mixers are not installed here can still be read."""
    path = Path(path)
    _, meta = _read(path)
    info = json.loads(meta.get("info", "{}"))
    return _config(meta, f"checkpoint {str(path)!r}"), info


def load(path: str | Path, *, device: torch.device | str = "cpu") -> LanguageModel:
    """The model saved at ``path``, each tensor in its saved dtype, on ``device``, in eval mode.

    Raises ``FileNotFoundError`` for a missing file (another ``OSError`` for a path that is not a regular file)
    and ``CheckpointError`` for a truncated, corrupt, foreign or mismatched one: weights that do not fit the saved
    config, checked before the model is built, or a tensor whose dtype is of another kind than the model's tensor
    there (an int32 weight; a float64 one loads as float64).
    """
    path = Path(path)
    where = f"checkpoint {str(path)!r}"
    data, meta = _read(path)
    config = _config(meta, where)
    try:
        tensors = safetensors.torch.load(data)
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise CheckpointError(f"{where} has truncated or corrupt tensor data: {exc}") from exc
    if meta.get("sha256") != checksum(tensors):
        raise CheckpointError(f"{where} is corrupt: its tensors do not match the checksum saved with them")
    shapes = {k: tuple(t.shape) for k, t in tensors.items()}
    _check_depth_and_embedding(config, shapes, where)
    try:
        config.check_against_registry()
    except ConfigError as exc:
        raise CheckpointError(f"{where} holds a config this installation cannot build: {exc}") from exc
    problem = mismatch(LanguageModel, config, tensors)
    if problem is not None:
        raise CheckpointError(f"{where}: {problem}")
    model = LanguageModel(config)
    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if len(dtypes) == 1:  # the usual case: buffers that are not saved (computed at init) follow the weights
        model.to(dtypes.pop())
    own = model.state_dict(keep_vars=True)
    for name, t in tensors.items():  # each tensor keeps its dtype (a float64 mixer in a float32 model)
        if own[name].dtype != t.dtype:
            own[name].data = own[name].data.to(t.dtype)  # through .data: a tied weight changes for both uses
    model.load_state_dict(tensors, strict=False)  # only the tied copies are absent, checked above
    return model.to(device).eval()
