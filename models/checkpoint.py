"""Checkpoints: one safetensors file holding the weights, with the model config as JSON in its header.

One file, so the config and the weights cannot get out of step, and so a save can be atomic (written to a
temporary file in the same folder, synced, then renamed over the target: a crash leaves the old
checkpoint or the new one, never half of one). Loading never unpickles: the header is JSON and the
tensors are raw bytes. A SHA-256 over the tensors, kept in the header, catches corrupted data that
still parses; a missing, truncated, foreign or mismatched file raises ``CheckpointError`` naming the
file and what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import Tensor

import mixers
from models.config import ConfigError, ModelConfig
from models.lm import LanguageModel

FORMAT = "seqmixers.lm"
FORMAT_VERSION = 2
# Config fields added after format version 1, with the value that reproduces what a version-1 model computed
# (a v1 file has no such key, and the field's new default would silently make it a different model).
V1_DEFAULTS = {"init": "gpt2"}
HEADER_LIMIT = 100_000_000  # safetensors' own limit on the JSON header


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit its config."""


def _tensors(model: torch.nn.Module) -> dict[str, Tensor]:
    """The state dict with each shared tensor (tied embeddings) once, under its first name."""
    out: dict[str, Tensor] = {}
    seen: set[tuple[int, tuple[int, ...]]] = set()
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), tuple(t.shape))
        if t.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().contiguous()
    return out


def checksum(tensors: Mapping[str, Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and raw bytes of ``tensors`` (in name order)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save(model: LanguageModel, path: str | Path, *, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``model``'s weights and config to ``path`` (a ``.safetensors`` file), atomically.

    ``metadata`` (JSON-able, e.g. the training step and validation loss) is stored alongside and comes
    back from ``read_header``. Returns the path written.
    """
    path = Path(path)
    tensors = {k: v.cpu() for k, v in _tensors(model).items()}
    try:
        header = {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "config": json.dumps(model.config.to_dict()),
            "info": json.dumps(dict(metadata or {})),
            "sha256": checksum(tensors),
            "seqmixers_version": mixers.__version__,
            "torch_version": torch.__version__,
        }
    except TypeError as exc:
        raise CheckpointError(f"cannot save to {str(path)!r}: config or metadata is not JSON: {exc}") from exc
    data = safetensors.torch.save(tensors, metadata=header)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return path


def _read(path: Path) -> tuple[bytes, dict[str, str]]:
    """The file's bytes and its header metadata, checked to be a seqmixers checkpoint."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    data = path.read_bytes()
    where = f"checkpoint {str(path)!r}"
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
    if not version.isdigit() or int(version) > FORMAT_VERSION:
        raise CheckpointError(
            f"{where} has format version {version!r}; this seqmixers reads versions up to {FORMAT_VERSION}"
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
    """The config and the saved metadata (``info``) of a checkpoint, without building the model."""
    path = Path(path)
    _, meta = _read(path)
    info = json.loads(meta.get("info", "{}"))
    return _config(meta, f"checkpoint {str(path)!r}"), info


def load(path: str | Path, *, device: torch.device | str = "cpu") -> LanguageModel:
    """The model saved at ``path``, in the saved dtype, on ``device``, in eval mode.

    Raises ``FileNotFoundError`` for a missing file and ``CheckpointError`` for a truncated, corrupt,
    foreign or mismatched one (weights that do not fit the saved config).
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
    model = LanguageModel(config)
    expected = _tensors(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [
        f"{k}: saved {list(tensors[k].shape)}, config needs {list(expected[k].shape)}"
        for k in sorted(set(expected) & set(tensors))
        if tensors[k].shape != expected[k].shape
    ]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{where}: its weights do not fit its config; missing {missing}, unexpected {unexpected}, "
            f"wrong shapes {wrong}"
        )
    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if len(dtypes) == 1:
        model.to(dtypes.pop())
    model.load_state_dict(tensors, strict=False)  # only the tied copies are absent, checked above
    return model.to(device).eval()
