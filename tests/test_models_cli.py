"""The ``seqmixers`` command end to end on a tiny config: train (embedded corpus or a text file), generate,
list, errors; and the demo (the README's main command) with a handful of steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mixers.__main__ import format_listing
from mixers.registry import get_registry
from models import cli, load, read_header
from models import data as corpus
from tests.models_helpers import one_thread  # noqa: F401  (autouse fixture)

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]

TINY = """
[model]
d_model = 16
n_layers = 2
layers = ["retention", "softmax_attention"]
ffn_dim = 32

[model.mixer_options]
retention = { num_heads = 2 }
softmax_attention = { num_heads = 2 }

[train]
steps = 4
batch_size = 2
seq_len = 16
eval_every = 2
eval_batches = 1
sample_tokens = 12
sample_prompt = "def "
"""


@pytest.fixture
def tiny(tmp_path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    return path


def test_train_then_generate(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--config", str(tiny), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("def ") and len(captured.out.encode()) >= 4, "the sample goes to stdout"
    log = captured.err
    assert "the embedded corpus (pydoc help text)" in log
    assert "step     2/4  val loss" in log and "step     4/4  val loss" in log and "val ppl" in log
    assert "tok/s" in log and f"checkpoint {out / 'model.safetensors'}" in log
    config, info = read_header(out / "model.safetensors")
    assert config.layers == ["retention", "softmax_attention"] and info["step"] == 4
    assert info["val_loss"] == pytest.approx(float(log.split("step     4/4  val loss ")[1].split()[0]), abs=1e-3)

    argv = ["generate", str(out / "model.safetensors"), "--prompt", "ab", "--max-new-tokens", "9", "--seed", "3"]
    assert cli.main(argv) == 0
    first = capsys.readouterr()
    assert first.out.startswith("ab") and "ms/token" in first.err
    assert cli.main(argv) == 0
    assert capsys.readouterr().out == first.out, "the same seed gives the same text"
    model = load(out / "model.safetensors")
    expected = model.generate(corpus.encode("ab"), 9, temperature=0.8, seed=3)
    assert first.out == corpus.decode(expected) + "\n"


def test_train_on_a_text_file_with_overrides(tiny, tmp_path, capsys):
    text = tmp_path / "words.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    out = tmp_path / "run"
    argv = ["train", "--config", str(tiny), "--data", str(text), "--out", str(out), "--steps", "2", "--quiet"]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert f"data: {text}, 1,800 bytes; 2 steps" in err and "step " not in err, "--quiet: no progress lines"
    assert read_header(out / "model.safetensors")[1]["step"] == 2


def test_train_errors_name_the_field(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text(TINY.replace("ffn_dim = 32", 'ffn = "relu"'))
    assert cli.main(["train", "--config", str(bad)]) == 2
    assert "ffn must be one of ['gelu', 'swiglu'], got 'relu'" in capsys.readouterr().err
    small = tmp_path / "small.toml"
    small.write_text(TINY.replace("d_model = 16", "d_model = 16\nvocab_size = 100"))
    assert cli.main(["train", "--config", str(small), "--out", str(tmp_path / "x")]) == 2
    assert "vocab_size=100 is too small for the byte tokenizer" in capsys.readouterr().err
    assert cli.main(["train", "--config", "no-such-preset"]) == 2
    assert "presets: [" in capsys.readouterr().err
    assert cli.main(["generate", str(tmp_path / "missing.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 3)
    assert cli.main(["generate", str(tmp_path / "junk.safetensors")]) == 2
    assert "truncated" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["generate", "x", "--prompt", ""])


def test_list_is_the_mixers_listing(capsys):
    assert cli.main(["list"]) == 0
    assert capsys.readouterr().out == format_listing(get_registry()) + "\n"


def test_console_script_is_registered():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["seqmixers"] == "models.cli:main"


def test_python_dash_m_models_runs_the_cli(tiny, tmp_path):
    """A real process: the entry module, a preset-free config, exit code and output streams."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEQMIXERS_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "models",
            "train",
            "--config",
            str(tiny),
            "--out",
            str(tmp_path),
            "--steps",
            "1",
            "--threads",
            "1",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("def ") and "step     1/1" in result.stderr
    assert (tmp_path / "model.safetensors").is_file()


def test_demo_writes_table_plot_and_json(tmp_path, capsys):
    from models import demo

    rows = demo.run(
        tmp_path,
        steps=2,
        lengths=(16, 48),
        table_lengths=(16, 48),
        decode_steps=1,
        decode_repeats=1,
        progress=False,
    )
    out = capsys.readouterr().out
    assert [r["name"] for r in rows] == list(demo.MODELS)
    table = out.split("== results")[1]
    for name in demo.MODELS:
        assert name in table
    assert "val ppl" in table and "decode ms @16" in table and "KV cache KiB @16" in table
    png = (tmp_path / "demo.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((tmp_path / "results.json").read_text())
    by_name = {m["name"]: m for m in results["models"]}
    retnet, transformer, hybrid = (by_name[n]["state_split"] for n in demo.MODELS)
    assert retnet[0]["growing_bytes"] == retnet[1]["growing_bytes"] == 0, "retention: no KV cache"
    assert retnet[0]["fixed_bytes"] == retnet[1]["fixed_bytes"] > 0, "and a fixed-size state"
    assert transformer[1]["growing_bytes"] == 3 * transformer[0]["growing_bytes"] > 0, "the KV cache grows with T"
    assert hybrid[0]["fixed_bytes"] > 0 and hybrid[1]["growing_bytes"] == 3 * hybrid[0]["growing_bytes"] > 0
    for name in demo.MODELS:
        assert (tmp_path / name / "model.safetensors").is_file()
        assert by_name[name]["val_ppl"] == pytest.approx(torch.tensor(by_name[name]["val_loss"]).exp().item())
