"""Checkpoint integrity: the SHA-256 covers the whole header (a flipped config bit is caught, and a file
written before that still loads), a save refuses to write what a load would refuse (and keeps the old
file), and a save removes the temporary files that killed writers left behind."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys

import pytest
import safetensors.torch
import torch
from torch import nn

from mixers.registry import get_registry
from models import CheckpointError, build_model, load, read_header
from models import checkpoint_format as ckpt
from models.lm import LanguageModel
from tests.models_helpers import one_thread, tiny_config  # noqa: F401  (one_thread is an autouse fixture)


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    return build_model(tiny_config(["retention"])).save(tmp_path / "m.safetensors", metadata={"step": 3})


def header(path) -> dict[str, str]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n])["__metadata__"]


def test_a_flipped_bit_in_the_config_is_caught(saved):
    """``norm_eps`` 1e-05 -> 1e-04 is one bit ('5' is 0x35, '4' is 0x34): still valid JSON, and a valid
    config, but another model. The header's own checksum catches it, in ``load`` and in ``read_header``."""
    data = bytearray(saved.read_bytes())
    at = data.index(b'norm_eps\\": 1e-05') + len(b'norm_eps\\": 1e-0')
    data[at] ^= 0x01
    saved.write_bytes(bytes(data))
    assert json.loads(header(saved)["config"])["norm_eps"] == 1e-04, "the flip leaves a readable config"
    for read in (load, read_header):
        with pytest.raises(CheckpointError, match=r"m\.safetensors' is corrupt: its header does not match"):
            read(saved)


def test_a_flipped_bit_in_the_metadata_is_caught(saved):
    data = bytearray(saved.read_bytes())
    at = data.index(b'"step\\": 3') + len(b'"step\\": ')
    data[at] ^= 0x02  # 3 -> 1
    saved.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"its header does not match the checksum saved with it"):
        read_header(saved)


def as_version_2(path) -> None:
    """Rewrite ``path`` exactly as a format-2 writer did: the same keys, the SHA-256 over the tensors only."""
    meta = header(path)
    del meta["header_sha256"]
    meta["format_version"] = "2"
    tensors = safetensors.torch.load(path.read_bytes())
    assert meta["sha256"] == ckpt.checksum(tensors)
    safetensors.torch.save_file(tensors, path, metadata=meta)


def test_a_version_2_checkpoint_still_loads_with_its_tensor_checksum(saved):
    model = load(saved)
    as_version_2(saved)
    loaded = load(saved)
    assert loaded.config == model.config and read_header(saved)[1] == {"step": 3}
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    data = bytearray(saved.read_bytes())
    data[-3] ^= 0x40  # its tensors are still checked
    saved.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"its tensors do not match the checksum"):
        load(saved)


def test_a_version_3_header_without_its_checksum_is_refused(saved):
    meta = header(saved)
    del meta["header_sha256"]
    safetensors.torch.save_file(safetensors.torch.load(saved.read_bytes()), saved, metadata=meta)
    with pytest.raises(CheckpointError, match=r"has no header checksum \(header_sha256\), which format version 3"):
        load(saved)


def untied_after_build():
    model = build_model(tiny_config(["retention"], tie_embeddings=True))
    model.lm_head.weight = nn.Parameter(model.tok_emb.weight.detach().clone())
    return model


def tied_after_build():
    model = build_model(tiny_config(["retention"], tie_embeddings=False))
    model.lm_head.weight = model.tok_emb.weight
    return model


def resized_embedding():
    model = build_model(tiny_config(["retention"]))
    model.tok_emb = nn.Embedding(40, 16)
    return model


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (untied_after_build, r"unexpected \['lm_head\.weight'\].*untied.*tie_embeddings=False"),
        (tied_after_build, r"missing \['lm_head\.weight'\]"),
        (resized_embedding, r"tok_emb\.weight: saved \[40, 16\], config needs \[32, 16\]"),
    ],
)
def test_save_refuses_what_load_would_refuse_and_keeps_the_old_file(saved, make, problem):
    before = saved.read_bytes()
    with pytest.raises(CheckpointError, match=rf"cannot save to '.*m\.safetensors': load would refuse it: .*{problem}"):
        make().save(saved)
    assert saved.read_bytes() == before
    assert [p.name for p in saved.parent.iterdir()] == ["m.safetensors"], "no temporary file"


def dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


@pytest.mark.skipif(sys.platform == "win32", reason="liveness is checked with POSIX signal 0")
def test_a_save_removes_temporary_files_of_dead_writers(saved):
    folder, host = saved.parent, socket.gethostname()
    dead, alive = dead_pid(), os.getppid()
    stale = [f".m.safetensors.{dead}.tmp", f".m.safetensors.{host}.{dead}.tmp"]  # before / since the host part
    kept = [
        f".m.safetensors.{alive}.tmp",  # a live writer's
        f".m.safetensors.{host}.{alive}.tmp",
        f".m.safetensors.other-host.{dead}.tmp",  # another machine's (a shared folder): its pid means nothing here
        f".best.safetensors.{dead}.tmp",  # another file's: cleaned when that file is saved
        "notes.txt",
    ]
    for name in stale + kept:
        (folder / name).write_bytes(b"partial")
    build_model(tiny_config(["retention"])).save(saved)
    assert sorted(p.name for p in folder.iterdir()) == sorted([*kept, "m.safetensors"])


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("mixer", sorted(get_registry().mixers))
def test_the_layout_a_save_checks_is_the_one_load_builds(mixer, tie):
    """A save checks against a model built on the meta device (no memory, no init); load builds a real one."""
    config = tiny_config([mixer, "softmax_attention"], tie_embeddings=tie, ffn="swiglu")
    real = {k: (tuple(t.shape), t.dtype) for k, t in ckpt.state_tensors(LanguageModel(config)).items()}
    assert {k: (tuple(t.shape), t.dtype) for k, t in ckpt.template(LanguageModel, config).items()} == real


@pytest.mark.parametrize("meta", [True, False])
def test_a_save_checks_without_drawing_from_the_global_rng(tmp_path, meta):
    """On the meta device, or on the CPU for a mixer that cannot be built there: either way the check must
    leave the RNG alone, or saving a checkpoint would change the training run (dropout) that saves it."""

    def no_meta(config):
        if torch.empty(()).device.type == "meta":
            raise NotImplementedError("this mixer computes its init")
        return LanguageModel(config)

    build = LanguageModel if meta else no_meta
    model = build_model(tiny_config(["retention"], tie_embeddings=True))
    rng = torch.get_rng_state()
    path = ckpt.save_checkpoint(model, tmp_path / "m.safetensors", build=build)
    assert torch.equal(torch.get_rng_state(), rng)
    assert load(path).config == model.config
    with pytest.raises(CheckpointError, match=r"load would refuse it"):
        ckpt.save_checkpoint(untied_after_build(), tmp_path / "m.safetensors", build=build)
