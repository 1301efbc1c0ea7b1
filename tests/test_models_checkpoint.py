"""Checkpoints: an exact round trip (weights, dtype, tying, config, metadata), atomic saves, and a clear
``CheckpointError`` for every kind of bad file: truncated, corrupt, foreign, mismatched, unbuildable."""

from __future__ import annotations

import json
import os
import struct

import pytest
import safetensors.torch
import torch

import mixers.registry as registry_module
from models import CheckpointError, ModelConfig, build_model, load, read_header
from models import checkpoint_format as ckpt
from tests.models_helpers import one_thread, tiny_config  # noqa: F401  (one_thread is an autouse fixture)


def trained_looking(config: ModelConfig, dtype: torch.dtype = torch.float32, seed: int = 0):
    """A model whose every weight differs from a fresh init, so a load that kept the init would show."""
    torch.manual_seed(seed)
    model = build_model(config).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("tie", [True, False])
def test_round_trip_is_exact(tmp_path, dtype, tie):
    config = tiny_config(["retention", "softmax_attention", "linear_attention"], tie_embeddings=tie, ffn="swiglu")
    model = trained_looking(config, dtype)
    path = model.save(tmp_path / "m.safetensors", metadata={"step": 12, "note": "hi"})
    loaded = load(path)
    assert loaded.config == config
    assert loaded.dtype == dtype and not loaded.training
    saved, got = model.state_dict(), loaded.state_dict()
    assert saved.keys() == got.keys()
    for k in saved:
        assert torch.equal(saved[k], got[k]), k
    assert (loaded.lm_head.weight is loaded.tok_emb.weight) == tie
    tokens = torch.randint(0, 32, (2, 9))
    if dtype != torch.bfloat16:
        with torch.no_grad():
            assert torch.equal(model.eval()(tokens)[0], loaded(tokens)[0])
    config2, info = read_header(path)
    assert config2 == config and info == {"step": 12, "note": "hi"}
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"], "no temporary files left"


def test_loaded_model_generates_like_the_saved_one(tmp_path):
    model = trained_looking(tiny_config(["retention", "softmax_attention"]))
    loaded = load(model.save(tmp_path / "m.safetensors"))
    assert torch.equal(model.generate([1, 2, 3], 15, seed=4), loaded.generate([1, 2, 3], 15, seed=4))


@pytest.fixture
def saved(tmp_path):
    model = trained_looking(tiny_config(["retention", "softmax_attention"]))
    return model.save(tmp_path / "m.safetensors")


def header_size(path) -> int:
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"checkpoint '.*nothing\.safetensors' does not exist"):
        load(tmp_path / "nothing.safetensors")


@pytest.mark.parametrize("keep", ["0", "5", "8", "mid-header", "end-of-header", "mid-data", "one-short"])
def test_truncated_file(saved, keep):
    data = saved.read_bytes()
    n = 8 + header_size(saved)
    cut = {
        "0": 0,
        "5": 5,
        "8": 8,
        "mid-header": n // 2,
        "end-of-header": n,
        "mid-data": (n + len(data)) // 2,
        "one-short": len(data) - 1,
    }[keep]
    saved.write_bytes(data[:cut])
    with pytest.raises(CheckpointError, match=r"checkpoint '.*m\.safetensors' (is truncated|has truncated or corrupt)"):
        load(saved)


def test_corrupt_tensor_bytes_fail_the_checksum(saved):
    data = bytearray(saved.read_bytes())
    data[-3] ^= 0x40  # a flipped bit in the last tensor: still parses, but is not what was saved
    saved.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"is corrupt: its tensors do not match the checksum"):
        load(saved)


def test_corrupt_header(saved):
    data = bytearray(saved.read_bytes())
    data[9] = ord("}")
    saved.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"has a corrupt header \(not JSON\)"):
        load(saved)


def rewrite_metadata(path, **changes) -> None:
    """Rewrite the checkpoint with its tensors and changed header metadata, and the header checksum that
    fits them: a file as a buggy or foreign writer would make it, not a corrupted one."""
    with open(path, "rb") as f:
        data = f.read()
    meta = json.loads(data[8 : 8 + header_size(path)])["__metadata__"]
    meta.update(changes)
    meta = {k: v for k, v in meta.items() if v is not None}
    meta["header_sha256"] = ckpt.header_checksum(meta)
    safetensors.torch.save_file(safetensors.torch.load(data), path, metadata=meta)


def test_foreign_safetensors_file(tmp_path):
    path = tmp_path / "other.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match=r"is a safetensors file but not a seqmixers checkpoint"):
        load(path)
    path.write_text("hello, I am a text file pretending to be a checkpoint")
    with pytest.raises(CheckpointError, match=r"is truncated or not a safetensors file"):
        load(path)


def test_weights_that_do_not_fit_the_config(saved):
    other = tiny_config(["retention", "softmax_attention"], d_model=32)
    rewrite_metadata(saved, config=json.dumps(other.to_dict()))
    with pytest.raises(
        CheckpointError,
        match=r"weights do not fit its config.*tok_emb\.weight: saved \[32, 16\], config needs \[32, 32\]",
    ):
        load(saved)
    deeper = tiny_config(["retention", "softmax_attention", "retention"])
    rewrite_metadata(saved, config=json.dumps(deeper.to_dict()))
    with pytest.raises(CheckpointError, match=r"n_layers=3, but its tensors are those of 2 layers"):
        load(saved)


def test_config_this_installation_cannot_build(saved):
    config = tiny_config(["retention", "softmax_attention"]).to_dict()
    config["layers"] = ["some_plugin_mixer", "softmax_attention"]
    rewrite_metadata(saved, config=json.dumps(config))
    with pytest.raises(
        CheckpointError, match=r"cannot build: layers\[0\]: unknown mixer 'some_plugin_mixer'; registered"
    ):
        load(saved)
    rewrite_metadata(saved, config="{not json")
    with pytest.raises(CheckpointError, match=r"missing or corrupt config"):
        load(saved)


def test_a_header_is_read_without_loading_any_plugin(saved, monkeypatch):
    """``read_header`` makes the config as data: it never loads the plugin registry, so a checkpoint whose
    mixers are not installed here (or whose plugins fail to load) can still be inspected; ``load``, which
    builds the model, is where the registry is needed and where an unknown mixer is named."""
    expected, info = read_header(saved)
    monkeypatch.setattr(registry_module, "_REGISTRY", None)

    def refuse(self, *args, **kwargs):
        raise AssertionError("the plugin registry was loaded")

    monkeypatch.setattr(registry_module.Registry, "load", refuse)
    assert read_header(saved) == (expected, info)
    config = expected.to_dict()
    config["layers"] = ["some_plugin_mixer", "softmax_attention"]
    rewrite_metadata(saved, config=json.dumps(config))
    header, _ = read_header(saved)
    assert header.layers == ["some_plugin_mixer", "softmax_attention"]
    with pytest.raises(AssertionError, match="the plugin registry was loaded"):
        load(saved)  # the loader is really blocked: a load needs it
    monkeypatch.undo()
    with pytest.raises(
        CheckpointError,
        match=r"holds a config this installation cannot build: layers\[0\]: unknown mixer 'some_plugin_mixer'; "
        r"registered mixers: gated_retention, linear_attention",
    ):
        load(saved)


def test_newer_format_version(saved):
    rewrite_metadata(saved, format_version="99")
    with pytest.raises(
        CheckpointError, match=rf"format version '99'; this seqmixers reads versions up to {ckpt.FORMAT_VERSION}"
    ):
        read_header(saved)


@pytest.mark.parametrize("version", ["\u00b2", "2.0", "", "-1"])
def test_a_format_version_that_is_not_a_whole_number_is_named(saved, version):
    """``"\u00b2"`` passes ``str.isdigit()`` and then broke ``int()`` with a raw ValueError."""
    rewrite_metadata(saved, format_version=version)
    with pytest.raises(CheckpointError, match=r"format_version must be a whole number written as a string, got"):
        read_header(saved)


def test_a_version_1_checkpoint_loads_as_the_model_it_was(tmp_path):
    """Version 1 predates ``init``/``embed_scale``: its models had no embedding scale. Reading the missing
    field as today's default (``init="scaled"``, scale sqrt(d)) would silently compute another function."""
    config = tiny_config(["retention", "softmax_attention"], init="gpt2")
    model = trained_looking(config)
    path = model.save(tmp_path / "v1.safetensors")
    old = {k: v for k, v in config.to_dict().items() if k not in ("init", "embed_scale")}
    rewrite_metadata(path, format_version="1", config=json.dumps(old))
    loaded = load(path)
    assert loaded.config.init == "gpt2" and loaded.config.embedding_scale == 1.0
    tokens = torch.randint(0, config.vocab_size, (2, 9))
    assert torch.equal(loaded(tokens)[0], model(tokens)[0])
    # The same header read as today's format would be a different model: the shim is what keeps it right.
    rewrite_metadata(path, format_version="2")
    assert load(path).config.embedding_scale == config.d_model**0.5


def test_save_is_atomic(saved, monkeypatch):
    """A save that fails midway leaves the previous checkpoint intact, and no temporary file."""
    before = saved.read_bytes()
    model = trained_looking(tiny_config(["retention", "softmax_attention"]), seed=1)

    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        model.save(saved)
    assert saved.read_bytes() == before
    assert os.listdir(saved.parent) == [saved.name]
    monkeypatch.undo()
    model.save(saved)  # and a save that completes replaces it
    assert torch.equal(load(saved).tok_emb.weight, model.tok_emb.weight)


def test_unserialisable_metadata(tmp_path):
    model = build_model(tiny_config(["retention"]))
    with pytest.raises(CheckpointError, match="not JSON"):
        model.save(tmp_path / "m.safetensors", metadata={"when": object()})
    assert not list(tmp_path.iterdir())
