"""Checkpoints: one safetensors file holding the weights, with the model config as JSON in its header.

One file, so the config and the weights cannot get out of step, and so a save can be atomic (written to a
temporary file in the same folder, synced, then renamed over the target: a crash leaves the old
checkpoint or the new one, never half of one; a later save removes what a killed writer left). Loading
never unpickles: the header is JSON and the tensors are raw bytes. A SHA-256 over the tensors and one over
the rest of the header (which holds the first) catch corrupted data or config that still parses; a
truncated, foreign or mismatched file raises ``CheckpointError`` naming the file and what is wrong (a path
that is not a regular file, an ``OSError`` saying what it is). The config is checked against the tensors'
names and shapes before a model is built, so a crafted header costs nothing; each tensor keeps its dtype.
A save refuses to write what a load would refuse, and names weights holding NaN or inf.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import socket
import stat
import struct
import warnings
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
# 3: ``header_sha256`` covers the whole header (config, metadata, the tensors' ``sha256``); before, a flipped
# bit in the config loaded silently as another model. Versions 1 and 2 are still read, their tensors checked.
FORMAT_VERSION = 3
HEADER_CHECKSUM_SINCE = 3
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


def header_checksum(meta: Mapping[str, str]) -> str:
    """SHA-256 over every header entry but ``header_sha256`` itself (canonical JSON: sorted keys, no spaces)."""
    rest = {k: v for k, v in meta.items() if k != "header_sha256"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _template(config: ModelConfig) -> dict[str, Tensor]:
    """The tensors (names, shapes, dtypes) a load of ``config`` expects, built on the meta device (no memory, no
    init), or on the CPU for a mixer that cannot be built there. Neither draws from the global RNG, so a save in a
    training loop does not change the run."""
    try:
        with torch.device("meta"):
            model = LanguageModel(config)
    except Exception:  # a plugin's mixer may compute its init; then build it for real, as load does
        with torch.random.fork_rng(devices=[]):
            return _tensors(LanguageModel(config))
    out: dict[str, Tensor] = {}
    seen: set[int] = set()  # meta tensors have no data pointers: tied weights are the same Parameter object
    for name, t in model.state_dict(keep_vars=True).items():
        if t.numel() and id(t) in seen:
            continue
        seen.add(id(t))
        out[name] = t.detach()
    return out


def _misfit(saved: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]]) -> str | None:
    """What keeps tensors of these names and shapes out of a model that expects ``expected``; None if they fit."""
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    wrong = [
        f"{k}: saved {list(saved[k])}, config needs {list(expected[k])}"
        for k in sorted(set(expected) & set(saved))
        if tuple(saved[k]) != tuple(expected[k])
    ]
    parts = [f"{what} {names}" for what, names in (("missing", missing), ("unexpected", unexpected)) if names]
    parts += [f"wrong shapes {wrong}"] if wrong else []
    return f"its weights do not fit its config; {', '.join(parts)}" if parts else None


def _kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    return "floating-point" if dtype.is_floating_point else "integer"


def _wrong_dtype(saved: Mapping[str, Tensor], expected: Mapping[str, Tensor]) -> str | None:
    """The first saved tensor whose dtype is of another kind than the model's (an int32 weight, a float step
    counter): a load keeps each tensor's dtype, and a cast would silently change what was saved."""
    for name in sorted(set(saved) & set(expected)):
        got, needed = saved[name].dtype, expected[name].dtype
        if _kind(got) != _kind(needed):
            return f"tensor {name!r} is {got}, but the model holds a {_kind(needed)} tensor there ({needed})"
    return None


def _mismatch(config: ModelConfig, tensors: Mapping[str, Tensor]) -> str | None:
    """What keeps ``tensors`` from loading into a model of ``config``: names, shapes, then dtypes."""
    expected = _template(config)
    shapes = {k: tuple(t.shape) for k, t in tensors.items()}
    return _misfit(shapes, {k: tuple(t.shape) for k, t in expected.items()}) or _wrong_dtype(tensors, expected)


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
    problem = _misfit(
        {k: shapes[k] for k in ("tok_emb.weight", "lm_head.weight") if k in shapes},
        {k: embedding for k in ("tok_emb.weight", "lm_head.weight") if k in shapes or k == "tok_emb.weight"},
    )
    if problem is not None:
        raise CheckpointError(f"{where}: {problem}")


def _check_loadable(model: LanguageModel, header: Mapping[str, str], tensors: Mapping[str, Tensor], where: str) -> None:
    """Raise if ``load`` would refuse these header and tensors: a save must not replace a good file with
    one that cannot be read back (say, a head untied after the model was built)."""
    try:
        config = ModelConfig.from_dict(json.loads(header["config"]))
    except ConfigError as exc:
        raise CheckpointError(f"{where}: load would refuse it: its config cannot be rebuilt: {exc}") from exc
    if config != model.config:
        raise CheckpointError(
            f"{where}: load would refuse it: its config does not survive JSON: {model.config} reads back as {config}"
        )
    problem = _mismatch(config, tensors)
    if problem is None:
        return
    shared = model.lm_head.weight is model.tok_emb.weight
    if config.tie_embeddings and not shared:
        problem += " (the head was untied after the model was built: build it with tie_embeddings=False)"
    elif shared and not config.tie_embeddings:
        problem += " (the head was tied after the model was built: build it with tie_embeddings=True)"
    raise CheckpointError(f"{where}: load would refuse it: {problem}")


def nonfinite(tensors: Mapping[str, Tensor], *, most: int = 5) -> list[str]:
    """The floating-point tensors holding NaN or infinite values, each as ``"name (k of n)"`` (the first ``most``,
    then how many more): weights like these cannot generate, and usually mean a training run diverged."""
    out = []
    for name, t in tensors.items():
        if not (t.is_floating_point() or t.is_complex()) or torch.isfinite(t.sum()):  # a NaN or inf spreads to the sum
            continue
        k = int(t.numel() - torch.isfinite(t).sum())  # counted only when the sum says so (or overflowed)
        if k:
            out.append(f"{name} ({k} of {t.numel()})")
    return out if len(out) <= most else [*out[:most], f"{len(out) - most} more tensors"]


def _host() -> str:
    return socket.gethostname().replace(os.sep, "_") or "localhost"


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (True when unsure: a live writer's file must stay)."""
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)  # signal 0: a check only, nothing is sent
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, under another user
        return True
    return True


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Remove the temporary files that writers of ``path`` killed mid-save (a crash, SIGKILL) left behind.

    A temporary file is ``.<name>.<host>.<pid>.tmp`` (earlier versions wrote ``.<name>.<pid>.tmp``, read as
    this host's); it is stale when ``host`` is this machine and no process ``pid`` is running. Files of other
    machines (a shared folder) and of live processes are left alone. POSIX only: on Windows ``os.kill``
    cannot test a process without stopping it, so nothing is removed. Returns the files removed.
    """
    if os.name != "posix":
        return []
    prefix, host, removed = f".{path.name}.", _host(), []
    try:
        names = os.listdir(path.parent)
    except OSError:
        return []
    for name in names:
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        writer, _, pid = name[len(prefix) : -len(".tmp")].rpartition(".")
        if not pid.isdigit() or writer not in ("", host) or _alive(int(pid)):
            continue
        try:
            (path.parent / name).unlink()
        except OSError:  # gone already (another writer cleaned it), or not ours to remove
            continue
        removed.append(path.parent / name)
    return removed


def save(model: LanguageModel, path: str | Path, *, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``model``'s weights and config to ``path`` (a ``.safetensors`` file), atomically.

    ``metadata`` (JSON-able, e.g. the training step and validation loss) is stored alongside and comes
    back from ``read_header``. Raises ``CheckpointError``, before touching ``path``, if ``load`` would
    refuse the file; warns (``RuntimeWarning``, naming them) of weights holding NaN or inf. Returns the path
    written.
    """
    path = Path(path)
    where = f"cannot save to {str(path)!r}"
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
        raise CheckpointError(f"{where}: config or metadata is not JSON: {exc}") from exc
    header["header_sha256"] = header_checksum(header)
    _check_loadable(model, header, tensors, where)
    parameters = {name for name, _ in model.named_parameters()}
    bad = nonfinite({k: t for k, t in tensors.items() if k in parameters})
    if bad:  # written all the same (a training run's last state may be worth inspecting); generate refuses it
        warnings.warn(
            f"saving {str(path)!r}: non-finite weights (NaN or inf) in {', '.join(bad)}: generate refuses such a "
            "checkpoint (did training diverge?)",
            RuntimeWarning,
            stacklevel=2,
        )
    data = safetensors.torch.save(tensors, metadata=header)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.{_host()}.{os.getpid()}.tmp")
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
    problem = _mismatch(config, tensors)
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
