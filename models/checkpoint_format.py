"""The checkpoint format and its writer: one safetensors file holding the weights, the config as JSON in its header.

One file, so the config and the weights cannot get out of step, and so a save can be atomic (written to a
temporary file in the same folder, synced, then renamed over the target: a crash leaves the old checkpoint or
the new one, never half of one; a later save removes what a killed writer left). A SHA-256 over the tensors and
one over the rest of the header (which holds the first) catch corrupted data or config that still parses. A
save refuses to write what a load would refuse, and names weights holding NaN or inf.

What the writer (``LanguageModel.save``) and the reader (``models.checkpoint``) share lives here; it imports
neither, and is given the model class to check a config against (``build``).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import safetensors.torch
import torch
from torch import Tensor, nn

import mixers
from models.config import ConfigError, ModelConfig

if TYPE_CHECKING:
    from models.lm import LanguageModel

# What a load builds from a config (``LanguageModel``): the model whose tensors a file must fit.
Build = Callable[[ModelConfig], nn.Module]

FORMAT = "seqmixers.lm"
# 3: ``header_sha256`` covers the whole header (config, metadata, the tensors' ``sha256``); before, a flipped
# bit in the config loaded silently as another model. Versions 1 and 2 are still read, their tensors checked.
FORMAT_VERSION = 3
HEADER_CHECKSUM_SINCE = 3


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit its config."""


def state_tensors(model: nn.Module) -> dict[str, Tensor]:
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


def template(build: Build, config: ModelConfig) -> dict[str, Tensor]:
    """The tensors (names, shapes, dtypes) a load of ``config`` expects: ``build(config)`` on the meta device (no
    memory, no init), or on the CPU for a mixer that cannot be built there. Neither draws from the global RNG, so
    a save in a training loop does not change the run."""
    try:
        with torch.device("meta"):
            model = build(config)
    except Exception:  # a plugin's mixer may compute its init; then build it for real, as load does
        with torch.random.fork_rng(devices=[]):
            return state_tensors(build(config))
    out: dict[str, Tensor] = {}
    seen: set[int] = set()  # meta tensors have no data pointers: tied weights are the same Parameter object
    for name, t in model.state_dict(keep_vars=True).items():
        if t.numel() and id(t) in seen:
            continue
        seen.add(id(t))
        out[name] = t.detach()
    return out


def misfit(saved: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]]) -> str | None:
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


def mismatch(build: Build, config: ModelConfig, tensors: Mapping[str, Tensor]) -> str | None:
    """What keeps ``tensors`` from loading into ``build(config)``: names, shapes, then dtypes."""
    expected = template(build, config)
    shapes = {k: tuple(t.shape) for k, t in tensors.items()}
    return misfit(shapes, {k: tuple(t.shape) for k, t in expected.items()}) or _wrong_dtype(tensors, expected)


def _check_loadable(
    model: LanguageModel, build: Build, header: Mapping[str, str], tensors: Mapping[str, Tensor], where: str
) -> None:
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
    problem = mismatch(build, config, tensors)
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


def save_checkpoint(
    model: LanguageModel, path: str | Path, *, build: Build, metadata: Mapping[str, Any] | None = None
) -> Path:
    """Write ``model``'s weights and config to ``path`` (a ``.safetensors`` file), atomically.

    ``metadata`` (JSON-able, e.g. the training step and validation loss) is stored alongside and comes
    back from ``read_header``. Raises ``CheckpointError``, before touching ``path``, if ``load`` (which
    builds the model with ``build``) would refuse the file; warns (``RuntimeWarning``, naming them) of weights
    holding NaN or inf. Returns the path written.
    """
    path = Path(path)
    where = f"cannot save to {str(path)!r}"
    tensors = {k: v.cpu() for k, v in state_tensors(model).items()}
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
    _check_loadable(model, build, header, tensors, where)
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
