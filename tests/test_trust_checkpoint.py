"""Checkpoints at the seams (issue 21): each tensor keeps its dtype through a save and a load (a dtype no model
tensor can take is refused, naming the tensor); a crafted header is checked against the tensors before anything
is built; non-finite weights are named at save and refused by ``generate``; a path that is not a file is named
for what it is."""

from __future__ import annotations

import json
import os
import struct
import time
import warnings

import pytest
import safetensors.torch
import torch

from models import CheckpointError, build_model, cli, load, read_header
from models import checkpoint_format as ckpt
from models import lm as lm_module
from tests.models_helpers import one_thread, tiny_config  # noqa: F401  (one_thread is an autouse fixture)


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    return build_model(tiny_config(["retention", "softmax_attention"])).save(tmp_path / "m.safetensors")


def rewrite(path, *, tensors=None, **config_changes) -> None:
    """Rewrite ``path`` as a writer that means it would: the given tensors (default: the file's) and config
    changes, with both checksums recomputed to fit, so only the loader's own checks can refuse it."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    meta = json.loads(data[8 : 8 + n])["__metadata__"]
    tensors = safetensors.torch.load(data) if tensors is None else tensors
    config = json.loads(meta["config"])
    config.update(config_changes)
    meta["config"] = json.dumps(config)
    meta["sha256"] = ckpt.checksum(tensors)
    meta["header_sha256"] = ckpt.header_checksum(meta)
    safetensors.torch.save_file(tensors, path, metadata=meta)


# -- item 7: dtypes ------------------------------------------------------------------------------------------


def test_a_model_with_one_float64_mixer_loads_with_that_mixer_in_float64(tmp_path):
    torch.manual_seed(0)
    model = build_model(tiny_config(["retention", "softmax_attention"], tie_embeddings=True))
    model.blocks[1].mixer.to(torch.float64)
    loaded = load(model.save(tmp_path / "m.safetensors"))
    saved, got = model.state_dict(), loaded.state_dict()
    assert {k: v.dtype for k, v in got.items()} == {k: v.dtype for k, v in saved.items()}
    assert any(v.dtype == torch.float64 for v in got.values()) and loaded.dtype == torch.float32
    for k in saved:
        assert torch.equal(saved[k], got[k]), k
    assert loaded.lm_head.weight is loaded.tok_emb.weight, "still tied"


def test_a_float64_tensor_in_a_float32_file_keeps_its_dtype_and_values(saved):
    tensors = safetensors.torch.load(saved.read_bytes())
    name = "blocks.0.ffn.fc.weight"
    tensors[name] = (tensors[name].double() + 1e-12).contiguous()  # a value float32 cannot hold
    rewrite(saved, tensors=tensors)
    got = load(saved).state_dict()[name]
    assert got.dtype == torch.float64 and torch.equal(got, tensors[name])


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.complex64])
def test_a_tensor_of_a_dtype_no_weight_can_take_is_refused_by_name(saved, dtype):
    tensors = safetensors.torch.load(saved.read_bytes())
    name = "blocks.1.ffn.proj.weight"
    tensors[name] = torch.ones_like(tensors[name], dtype=dtype)
    rewrite(saved, tensors=tensors)
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' is {dtype}, but .* floating-point"):
        load(saved)


# -- item 12: a crafted header is refused before anything is built ---------------------------------------------


@pytest.fixture
def no_build(monkeypatch):
    """Fail the test if a model is built other than on the meta device (the cost a crafted header must not buy)."""
    build = lm_module.LanguageModel.__init__

    def refuse(self, config):
        if torch.empty(0).device.type != "meta":
            raise AssertionError(f"a model was built for {config}")
        build(self, config)

    monkeypatch.setattr(lm_module.LanguageModel, "__init__", refuse)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"n_layers": 100_000}, r"n_layers=100000, but its tensors are those of 2 layers"),
        ({"vocab_size": 10**12}, r"tok_emb\.weight: saved \[32, 16\], config needs \[1000000000000, 16\]"),
        ({"d_model": 10**7}, r"tok_emb\.weight: saved \[32, 16\], config needs \[32, 10000000\]"),
        ({"ffn_dim": 10**9}, r"blocks\.0\.ffn\.fc\.weight: saved \[24, 16\], config needs \[1000000000, 16\]"),
    ],
    ids=["n_layers", "vocab_size", "d_model", "ffn_dim"],
)
def test_a_crafted_header_is_refused_before_building_anything(saved, no_build, changes, message):
    if "n_layers" in changes:  # a valid config of that depth: one layer pattern, repeated
        changes = {**changes, "layers": ["retention"]}
    rewrite(saved, **changes)
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=rf"its weights do not fit its config.*{message}"):
        load(saved)
    assert time.perf_counter() - start < 5, "refused at once"


# -- item 13: non-finite weights ---------------------------------------------------------------------------------


@pytest.fixture
def nan_model():
    torch.manual_seed(0)
    model = build_model(tiny_config(["retention"], vocab_size=256))
    with torch.no_grad():
        model.blocks[0].ffn.fc.weight[0, :3] = float("nan")
        model.blocks[0].ffn.proj.weight[1, 1] = float("inf")
    return model


def test_save_warns_about_non_finite_weights_naming_them(nan_model, tmp_path):
    with pytest.warns(RuntimeWarning, match=r"non-finite.*blocks\.0\.ffn\.fc\.weight \(3 of 384\)") as record:
        nan_model.save(tmp_path / "m.safetensors")
    assert "blocks.0.ffn.proj.weight (1 of 384)" in str(record[0].message)


def test_generate_refuses_a_checkpoint_with_non_finite_weights(nan_model, tmp_path, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        path = nan_model.save(tmp_path / "m.safetensors")
    code = cli.main(["generate", str(path), "--max-new-tokens", "3"])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert "holds non-finite weights: blocks.0.ffn.fc.weight (3 of 384)" in err, err


# -- item 15: what a path that is not a checkpoint file is --------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.mkdir(), r"is a directory, not a checkpoint file"),
        (lambda p: os.mkfifo(p), r"is not a regular file \(a FIFO\)"),
        (lambda p: os.symlink(p.name, p), r"is a symbolic link loop"),
        (lambda p: None, r"does not exist"),
    ],
    ids=["directory", "fifo", "symlink-loop", "missing"],
)
def test_a_path_that_is_not_a_checkpoint_file_is_named_for_what_it_is(tmp_path, capsys, make, message):
    path = tmp_path / "m.safetensors"
    make(path)
    for read in (load, read_header):
        with pytest.raises(OSError, match=rf"checkpoint '.*m\.safetensors' {message}"):
            read(path)
    code = cli.main(["generate", str(path)])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and "Traceback" not in err
    assert f"seqmixers generate: error: checkpoint {str(path)!r} " in err and len(err.splitlines()) == 1, err
