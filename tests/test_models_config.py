"""Model and training configs: every invalid field gives an error that names it (and what it allows); files in
TOML, YAML and JSON, dicts and keywords give the same config; the layer pattern expands as documented."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import typing

import pytest

import mixers
import mixers.registry as registry_module
from models import ConfigError, ModelConfig, TrainConfig, build_model, load_run_config, presets
from models.config import resolve_config, split_run_config
from tests.models_helpers import one_thread  # noqa: F401  (autouse fixture)


@pytest.fixture
def no_plugin_loading(monkeypatch):
    """Forget the loaded registry and make loading one fail: any use of the registry raises."""
    monkeypatch.setattr(registry_module, "_REGISTRY", None)

    def refuse(self, *args, **kwargs):
        raise AssertionError("the plugin registry was loaded")

    monkeypatch.setattr(registry_module.Registry, "load", refuse)
    return monkeypatch


MODEL_ERRORS = [
    ({"vocab_size": 0}, r"vocab_size must be an int >= 1, got 0"),
    ({"d_model": "64"}, r"d_model must be an int >= 1, got '64' \(str\)"),
    ({"d_model": 64.0}, r"d_model must be an int"),
    ({"n_layers": 0}, r"n_layers must be an int >= 1"),
    ({"n_layers": True}, r"n_layers must be an int"),
    ({"layers": []}, r"layers must be a non-empty list"),
    ({"layers": 3}, r"layers must be a non-empty list"),
    ({"layers": ["retention"] * 3, "n_layers": 4}, r"layers has 3 entries, which does not divide n_layers=4"),
    ({"layers": ["retention"] * 5, "n_layers": 4}, r"layers has 5 entries"),
    ({"layers": [{"num_heads": 2}]}, r"layers\[0\] is a table without a 'mixer' key; registered mixers"),
    ({"layers": [7]}, r"layers\[0\] must be a mixer name or a table"),
    ({"layers": [{"mixer": "retention", "backend": 3}]}, r"layers\[0\]\.backend must be a non-empty string"),
    ({"layers": [{"mixer": "retention", "ffn_dim": 0}]}, r"layers\[0\]\.ffn_dim must be an int >= 1"),
    ({"layers": [{"mixer": "retention", "d_model": 8}]}, r"layers\[0\]\.d_model: set d_model at the top level"),
    ({"mixer_options": {"retention": 4}}, r"mixer_options\.retention must be a table of options"),
    ({"mixer_options": ["retention"]}, r"mixer_options must be a table"),
    ({"backend": ""}, r"backend must be a non-empty string"),
    ({"ffn": "relu"}, r"ffn must be one of \['gelu', 'swiglu'\], got 'relu'"),
    ({"ffn_dim": -4}, r"ffn_dim must be an int >= 1"),
    ({"norm": "batchnorm"}, r"norm must be one of \['layernorm', 'rmsnorm'\], got 'batchnorm'"),
    ({"norm_eps": 0.0}, r"norm_eps must be in \(0.0, 1.0\]"),
    ({"dropout": 1.0}, r"dropout must be in \[0.0, 1.0\), got 1.0"),
    ({"dropout": "0.1"}, r"dropout must be a finite number, got '0.1' \(str\) \(a number in quotes\?"),
    ({"dropout": float("nan")}, r"dropout must be a finite number"),
    ({"tie_embeddings": "yes"}, r"tie_embeddings must be true or false, got 'yes'"),
    ({"chunk_size": 0}, r"chunk_size must be an int >= 1"),
    ({"init": "xavier"}, r"init must be one of \['scaled', 'gpt2'\], got 'xavier'"),
    ({"embed_scale": 0}, r"embed_scale must be in \(0.0, 1000000.0\], got 0"),
    ({"embed_scale": "8"}, r"embed_scale must be a finite number, got '8' \(str\)"),
]


@pytest.mark.parametrize(("fields", "match"), MODEL_ERRORS, ids=[m[1][:40] for m in MODEL_ERRORS])
def test_each_invalid_model_field_is_named(fields, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_dict(fields)


# What only the registry knows: checked when a model is built (or a run file is loaded), not when a config is made.
REGISTRY_ERRORS = [
    (
        {"layers": ["retnetion"]},
        r"layers\[0\]: unknown mixer 'retnetion'; registered mixers: gated_retention, linear_attention, retention",
    ),
    ({"layers": ["retention", "bogus"], "n_layers": 2}, r"layers\[1\]: unknown mixer 'bogus'"),
    ({"layers": [{"mixer": "nope"}]}, r"layers\[0\]\.mixer: unknown mixer 'nope'"),
    (
        {"layers": [{"mixer": "retention", "num_head": 2}]},
        r"unknown option of mixer 'retention' in layers\[0\]: 'num_head' \(did you mean 'num_heads'\?\); allowed: \[",
    ),
    (
        {"mixer_options": {"retention": {"bogus": 1}}},
        r"unknown option of mixer 'retention' in mixer_options\.retention: 'bogus'",
    ),
    ({"mixer_options": {"nope": {}}}, r"mixer_options\.nope: unknown mixer 'nope'"),
]


@pytest.mark.parametrize(("fields", "match"), REGISTRY_ERRORS, ids=[m[1][:40] for m in REGISTRY_ERRORS])
def test_each_field_the_registry_rejects_is_named_when_the_model_is_built(fields, match, no_plugin_loading):
    config = ModelConfig.from_dict(fields)  # data: made without loading a plugin
    assert ModelConfig.from_dict(config.to_dict()) == config
    no_plugin_loading.undo()
    with pytest.raises(ConfigError, match=match):
        build_model(config)
    with pytest.raises(ConfigError, match=match):
        config.check_against_registry()
    with pytest.raises(ConfigError, match=r"config \[model\]: " + match):
        split_run_config({"model": fields})
    with pytest.raises(ConfigError, match=r"config: " + match):
        split_run_config(fields)


TRAIN_ERRORS = [
    ({"steps": 0}, r"steps must be an int >= 1"),
    ({"batch_size": 1.5}, r"batch_size must be an int"),
    ({"seq_len": None}, r"seq_len must be an int"),
    ({"lr": 0}, r"lr must be in \(0.0, 10.0\]"),
    (
        {"lr": "3e-3"},
        r"lr must be a finite number, got '3e-3' \(str\) \(a number in quotes\? YAML also reads 3e-3 as a string",
    ),
    ({"min_lr_ratio": 2}, r"min_lr_ratio must be in \[0.0, 1.0\]"),
    ({"warmup_steps": -1}, r"warmup_steps must be an int >= 0"),
    ({"beta2": 1.0}, r"beta2 must be in \[0.0, 1.0\)"),
    ({"grad_clip": -1}, r"grad_clip must be in"),
    ({"mode": "recurrent"}, r"mode must be one of \['parallel', 'chunkwise'\], got 'recurrent'"),
    ({"eval_every": 0}, r"eval_every must be an int >= 1"),
    ({"val_fraction": 0.9}, r"val_fraction must be in \(0.0, 0.5\]"),
    ({"temperature": -1}, r"temperature must be in"),
    ({"top_k": 0}, r"top_k must be an int >= 1"),
    ({"sample_prompt": 3}, r"sample_prompt must be a string"),
    ({"data": ""}, r"data must be a non-empty string"),
    ({"parallel": "zero"}, r"parallel must be one of \['none', 'ddp', 'fsdp'\]"),
    ({"context_parallel": 0}, r"context_parallel must be an int >= 1"),
    ({"checkpoint_activations": 1}, r"checkpoint_activations must be true or false"),
]


@pytest.mark.parametrize(("fields", "match"), TRAIN_ERRORS, ids=[m[1][:30] for m in TRAIN_ERRORS])
def test_each_invalid_train_field_is_named(fields, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig.from_dict(fields)


def test_unknown_fields_and_sections_suggest_the_closest():
    with pytest.raises(ConfigError, match=r"unknown model config field 'd_modle' \(did you mean 'd_model'\?\)"):
        ModelConfig.from_dict({"d_modle": 64})
    with pytest.raises(ConfigError, match=r"unknown train config field 'stpes' \(did you mean 'steps'\?\)"):
        TrainConfig.from_dict({"stpes": 1})
    with pytest.raises(ConfigError, match=r"config: unknown section \[trian\] \(did you mean \[train\]\?\)"):
        split_run_config({"model": {}, "trian": {}})
    with pytest.raises(ConfigError, match=r"config \[train\]: steps must be"):
        split_run_config({"model": {}, "train": {"steps": 0}})
    with pytest.raises(TypeError, match=r"unknown model config field 'd_modle' \(did you mean 'd_model'\?\)"):
        ModelConfig(d_modle=64)


@pytest.mark.parametrize(
    ("fields", "where"),
    [
        ({"backend": "cuda9"}, "backend"),
        ({"mixer_options": {"retention": {"backend": "cuda9"}}}, r"mixer_options\.retention\.backend"),
        ({"layers": [{"mixer": "retention", "backend": "cuda9"}]}, r"layers\[0\]\.backend"),
    ],
)
def test_backend_names_are_checked_against_the_registry(fields, where):
    config = ModelConfig(d_model=16, n_layers=1, **fields)  # data; the registry is consulted at build
    match = (
        where + r": unknown backend 'cuda9' for mixer 'retention' \(op 'retention'\); "
        r"expected 'auto' or one of \[.*'torch'"
    )
    with pytest.raises(ConfigError, match=match):
        build_model(config)
    with pytest.raises(ConfigError, match=match):
        config.layer_specs()


HYBRID = {
    "vocab_size": 64,
    "d_model": 16,
    "n_layers": 4,
    "layers": ["retention", {"mixer": "softmax_attention", "ffn_dim": 40, "num_heads": 4, "backend": "torch"}],
    "mixer_options": {"retention": {"num_heads": 2, "gate": False}, "softmax_attention": {"num_heads": 2}},
    "ffn": "swiglu",
    "norm": "rmsnorm",
}

TOML = """
[model]
vocab_size = 64
d_model = 16
n_layers = 4
layers = ["retention", { mixer = "softmax_attention", ffn_dim = 40, num_heads = 4, backend = "torch" }]
ffn = "swiglu"
norm = "rmsnorm"

[model.mixer_options]
retention = { num_heads = 2, gate = false }
softmax_attention = { num_heads = 2 }

[train]
steps = 7
lr = 1e-3
"""

YAML = """
model:
  vocab_size: 64
  d_model: 16
  n_layers: 4
  layers:
    - retention
    - {mixer: softmax_attention, ffn_dim: 40, num_heads: 4, backend: torch}
  mixer_options:
    retention: {num_heads: 2, gate: false}
    softmax_attention: {num_heads: 2}
  ffn: swiglu
  norm: rmsnorm
train:
  steps: 7
  lr: 1.0e-3
"""


def test_files_dicts_and_keywords_give_the_same_config(tmp_path):
    expected = ModelConfig(**HYBRID)
    assert ModelConfig.from_dict(HYBRID) == expected
    assert ModelConfig.from_dict(expected.to_dict()) == expected
    (tmp_path / "c.toml").write_text(TOML)
    (tmp_path / "c.yaml").write_text(YAML)
    (tmp_path / "c.json").write_text(json.dumps({"model": HYBRID, "train": {"steps": 7, "lr": 1e-3}}))
    (tmp_path / "bare.json").write_text(json.dumps(HYBRID))
    for name in ("c.toml", "c.yaml", "c.json"):
        model, train = load_run_config(tmp_path / name)
        assert model == expected, name
        assert train == TrainConfig(steps=7, lr=1e-3), name
    assert ModelConfig.from_file(tmp_path / "bare.json") == expected
    assert load_run_config(tmp_path / "bare.json")[1] == TrainConfig()


def test_layer_pattern_expands_with_per_layer_overrides():
    specs = ModelConfig(**HYBRID).layer_specs()
    assert [s.mixer for s in specs] == ["retention", "softmax_attention"] * 2
    assert specs[0].options == {"num_heads": 2, "gate": False, "backend": "auto"}
    assert specs[1].options == {"num_heads": 4, "backend": "torch"}, "a layer table overrides mixer_options"
    assert [s.ffn_dim for s in specs] == [48, 40, 48, 40], "swiglu default 8/3 d rounded to 8; layer override"
    model = build_model(ModelConfig(**HYBRID))
    assert model.blocks[1].mixer.num_heads == 4 and model.blocks[0].mixer.num_heads == 2
    assert not model.blocks[2].mixer.gate
    assert ModelConfig(d_model=16, layers="linear_attention").layers == ["linear_attention"]
    assert ModelConfig(d_model=8).default_ffn_dim == 32


def test_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nd_model = 3")
    with pytest.raises(ConfigError, match=r"could not parse config file '.*bad\.toml': TOMLDecodeError"):
        load_run_config(bad)
    with pytest.raises(ConfigError, match=r"unknown suffix '\.ini'; expected one of"):
        load_run_config(tmp_path / "c.ini")
    with pytest.raises(FileNotFoundError, match=r"config file '.*missing\.toml' does not exist"):
        load_run_config(tmp_path / "missing.toml")
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a table of fields, got list"):
        load_run_config(listy)
    typo = tmp_path / "typo.toml"
    typo.write_text("[model]\nd_model = 16\nlayers = ['retention', 'softmax_atention']\nn_layers = 2\n")
    with pytest.raises(ConfigError, match=r"typo\.toml' \[model\]: layers\[1\]: unknown mixer 'softmax_atention'"):
        load_run_config(typo)
    with pytest.raises(FileNotFoundError, match=r"neither a file nor a preset; presets: \["):
        resolve_config("no-such-preset")


def test_presets_load_and_build():
    shipped = presets()
    assert {"retnet-tiny", "transformer-tiny", "hybrid-tiny", "linear-tiny"} <= set(shipped)
    counts = {}
    for name, path in shipped.items():
        model_config, train_config = load_run_config(path)
        assert resolve_config(name) == path
        counts[name] = build_model(model_config).num_parameters()
    # the tiny presets are matched in size (within 1%), so the demo compares like with like
    assert max(counts.values()) / min(counts.values()) < 1.01, counts


def test_unknown_mixer_error_lists_every_registered_mixer():
    with pytest.raises(ConfigError) as info:
        build_model(ModelConfig(layers=["nope"]))
    for name in mixers.get_registry().mixers:
        assert name in str(info.value)


def test_a_run_file_holds_every_setting_of_a_run(tmp_path):
    """The parallelism, the data and its tokenizer are train fields like any other, so a run file (and the saved
    state of a resumed run) holds them; a Path given for the data is kept as text."""
    path = tmp_path / "run.toml"
    path.write_text(
        '[model]\nd_model = 16\n[train]\nparallel = "fsdp"\ncontext_parallel = 1\ndata = "corpus/"\n'
        'tokenizer = "bpe"\ndocuments = "lines"\n'
    )
    train = load_run_config(path)[1]
    assert (train.parallel, train.data, train.tokenizer, train.documents) == ("fsdp", "corpus/", "bpe", "lines")
    assert TrainConfig.from_dict(train.to_dict()) == train
    assert TrainConfig(data=tmp_path).data == str(tmp_path)


def test_the_train_modes_are_the_ops_modes_but_recurrent():
    from mixers.functional import MODES
    from models.config import TRAIN_MODES

    assert TRAIN_MODES == tuple(m for m in MODES if m != "recurrent")


def test_every_train_field_is_a_train_option_that_overrides_it():
    """``seqmixers train --NAME VALUE`` for every field of ``TrainConfig``, each to a value other than its default:
    the run's train config is the config file's with those values."""
    from models import cli

    types = typing.get_type_hints(TrainConfig)
    values, argv = {}, ["train", "--config", "run.toml"]
    for f in dataclasses.fields(TrainConfig):
        kind, option = types[f.name], f"--{f.name.replace('_', '-')}"
        if f.metadata["choices"]:
            value = next(c for c in reversed(f.metadata["choices"]) if c != f.default)
        elif kind is bool:
            value = not f.default
        elif f.default is None:
            value = "corpus" if f.name == "data" else 5
        else:
            value = f.default + "x" if kind is str else f.default + 1 if kind is int else f.default / 2
        values[f.name] = value
        argv += ([option] if value else [f"--no-{option[2:]}"]) if kind is bool else [option, str(value)]
    base = TrainConfig(steps=1)
    assert cli._with_overrides(base, cli.parser().parse_args(argv)) == TrainConfig(**values)
    assert cli._with_overrides(base, cli.parser().parse_args(argv[:3])) == base, "nothing given: the file's"


def test_keyword_typos_suggest_the_closest_field():
    """``ModelConfig(d_modle=64)`` says what the files say; the error is a TypeError (a bad keyword) and a
    ConfigError (so the CLI reports it), and positional arguments still work."""
    with pytest.raises(ConfigError, match=r"unknown model config field 'd_modle' \(did you mean 'd_model'\?\)"):
        ModelConfig(d_modle=64)
    with pytest.raises(TypeError, match=r"unknown train config field 'stpes' \(did you mean 'steps'\?\)"):
        TrainConfig(stpes=1)
    assert ModelConfig(256, 32).d_model == 32 and TrainConfig(5).steps == 5
    with pytest.raises(TypeError, match="multiple values for argument 'vocab_size'"):
        ModelConfig(256, vocab_size=3)


@pytest.mark.parametrize("name", ["empty.toml", "empty.yaml", "empty.json", "blank.toml", "comment.yaml"])
def test_an_empty_config_file_is_an_error_not_the_default_model(tmp_path, name):
    path = tmp_path / name
    path.write_text({"blank.toml": "\n\n", "comment.yaml": "# nothing yet\n"}.get(name, ""))
    with pytest.raises(ConfigError, match=rf"config file '.*{name}' is empty: expected a \[model\] section"):
        load_run_config(path)


def test_a_section_typo_is_named_with_the_file(tmp_path):
    path = tmp_path / "typo.toml"
    path.write_text("[modle]\nd_model = 16\n")
    with pytest.raises(
        ConfigError, match=r"config file '.*typo\.toml': unknown section \[modle\] \(did you mean \[model\]\?\)"
    ):
        load_run_config(path)
    path.write_text("[model]\nd_model = 16\n[trian]\nsteps = 3\n")
    with pytest.raises(
        ConfigError, match=r"config file '.*typo\.toml': unknown section \[trian\] \(did you mean \[train\]\?\)"
    ):
        load_run_config(path)
    bare = tmp_path / "bare.toml"
    bare.write_text("d_modle = 16\n")  # a model config without sections: its errors name the file too
    with pytest.raises(
        ConfigError, match=r"config file '.*bare\.toml': unknown model config field 'd_modle' \(did you"
    ):
        load_run_config(bare)


def test_a_config_file_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("model:\n  d_model: 16  # caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"config file '.*latin1\.yaml' is not UTF-8 text: byte 0xe9 at offset 27"):
        load_run_config(path)


def test_a_config_is_data_made_without_loading_any_plugin(no_plugin_loading, tmp_path):
    """Making, copying and reading a config (keywords, dict, file with ``check_registry=False``) loads no
    plugin, even for a mixer no plugin here provides; building the model is what checks it."""
    fields = {
        "d_model": 16,
        "n_layers": 2,
        "layers": ["not_installed_mixer", {"mixer": "retention", "num_heads": 2, "backend": "cuda9", "ffn_dim": 8}],
        "mixer_options": {"not_installed_mixer": {"width": (3, 4)}},
    }
    config = ModelConfig(**fields)
    assert config.mixer_options == {"not_installed_mixer": {"width": [3, 4]}}, "tuples become lists, as before"
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    (tmp_path / "c.json").write_text(json.dumps({"model": config.to_dict()}))
    assert load_run_config(tmp_path / "c.json", check_registry=False)[0] == config
    assert ModelConfig.from_file(tmp_path / "c.json", check_registry=False) == config
    assert split_run_config(config.to_dict(), check_registry=False)[0] == config
    assert config.default_ffn_dim == 64 and config.embedding_scale == 4.0
    # structural errors still come at once, and need no plugin either
    with pytest.raises(ConfigError, match=r"layers\[0\]\.d_model: set d_model at the top level"):
        ModelConfig(layers=[{"mixer": "not_installed_mixer", "d_model": 8}])
    with pytest.raises(ConfigError, match=r"layers\[0\] is a table without a 'mixer' key"):
        ModelConfig(layers=[{"num_heads": 2}])
    with pytest.raises(ConfigError, match=r"layers\[0\]\.mixer: unknown mixer 3"):
        ModelConfig(layers=[{"mixer": 3}])
    with pytest.raises(AssertionError, match="the plugin registry was loaded"):
        build_model(config)  # the loader is really blocked: building needs it
    no_plugin_loading.undo()
    with pytest.raises(
        ConfigError,
        match=r"^mixer_options\.not_installed_mixer: unknown mixer 'not_installed_mixer'; registered mixers: gated_ret",
    ):
        build_model(config)


def test_the_registry_to_check_against_can_be_given():
    config = ModelConfig(d_model=16, n_layers=1, mixer_options={"retention": {"num_heads": 2}})
    config.check_against_registry()
    assert [s.mixer for s in config.layer_specs(mixers.get_registry())] == ["retention"]
    empty = registry_module.Registry().load(builtins=(), entry_points=False)
    with pytest.raises(
        ConfigError, match=r"^mixer_options\.retention: unknown mixer 'retention'; registered mixers: $"
    ):
        config.check_against_registry(empty)


def test_importing_and_making_configs_loads_no_plugin(tmp_path):
    """In a fresh interpreter whose plugin loading fails: import the models package and its config and
    checkpoint modules, make a config and read a checkpoint's header; nothing loads the registry."""
    path = build_model(ModelConfig(d_model=16, n_layers=1, ffn_dim=8, mixer_options={"retention": {"num_heads": 2}}))
    path = path.save(tmp_path / "m.safetensors", metadata={"step": 5})
    script = f"""
import mixers.registry as registry
def refuse(self, *args, **kwargs):
    raise AssertionError("the plugin registry was loaded")
registry.Registry.load = refuse
import models
from models import ModelConfig, read_header
from models.config import load_run_config
import models.lm, models.checkpoint
config = ModelConfig(d_model=16, n_layers=2, layers=["not_installed_mixer", "retention"])
assert ModelConfig.from_dict(config.to_dict()) == config
header, info = read_header({str(path)!r})
assert header.d_model == 16 and info == {{"step": 5}}, (header, info)
assert registry._REGISTRY is None
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
