"""The ``seqmixers`` command end to end on a tiny config: train (embedded corpus or a text file), generate,
list, errors; and the demo (the README's main command) with a handful of steps."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mixers.listing import format_listing
from mixers.registry import get_registry
from models import cli, load, read_header
from models.training.tokenizers import ByteTokenizer
from tests.models_helpers import one_thread, run_main  # noqa: F401  (one_thread is an autouse fixture)

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
    expected = model.generate(ByteTokenizer().encode("ab"), 9, temperature=0.8, seed=3)
    assert first.out == ByteTokenizer().decode(expected) + "\n"


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


def test_demo_writes_table_plot_and_json(tmp_path, capsys, monkeypatch):
    from models import demo

    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    rows = demo.run(
        tmp_path,
        steps=2,
        lengths=(16, 48),
        table_lengths=(16, 48),
        decode_steps=1,
        decode_repeats=1,
    )
    for name in demo.MODELS:  # progress bars on a terminal: training, then the decode profile
        assert re.search(rf"{name}: 100%\|.*\| 2/2 \[.*(step/s|s/step)", terminal.getvalue()), terminal.getvalue()
        assert re.search(rf"{name} decode profile: 100%\|.*\| 2/2 \[.*(length/s|s/length)", terminal.getvalue())
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


# --- usage errors: an argparse-style message naming the option, exit code 2, never a traceback ---------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny untrained byte-level model, saved."""
    from models import ModelConfig, build_model

    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    config = ModelConfig(d_model=16, n_layers=1, ffn_dim=16, mixer_options={"retention": {"num_heads": 2}})
    build_model(config).save(path)
    return path


class Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def _a_file(tmp_path: Path) -> str:
    (tmp_path / "a-file").write_text("x")
    return str(tmp_path / "a-file")


USAGE_ERRORS = [
    # (argv given the tiny config, the checkpoint and tmp_path; the expected message)
    (lambda c, k, t: ["generate", k, "--max-new-tokens", "-1"], r"argument --max-new-tokens: expected an int >= 0, "),
    (lambda c, k, t: ["generate", k, "--top-k", "0"], r"argument --top-k: expected an int >= 1, got '0'"),
    (lambda c, k, t: ["generate", k, "--temperature", "-1"], r"argument --temperature: expected a finite number >= 0"),
    (lambda c, k, t: ["generate", k, "--temperature", "nan"], r"argument --temperature: .*got 'nan'"),
    (lambda c, k, t: ["generate", k, "--temperature", "inf"], r"argument --temperature: .*got 'inf'"),
    (lambda c, k, t: ["generate", k, "--seed", "a"], r"argument --seed: expected an int in \[0, 2\*\*64\), got 'a'"),
    (lambda c, k, t: ["generate", k, "--threads", "0"], r"argument --threads: expected an int >= 1, got '0'"),
    (
        lambda c, k, t: ["train", "--config", c, "--threads", "-1"],
        r"argument --threads: expected an int >= 1, got '-1'",
    ),
    (lambda c, k, t: ["demo", "--threads", "0"], r"argument --threads: expected an int >= 1, got '0'"),
    (lambda c, k, t: ["demo", "--steps", "0"], r"argument --steps: expected an int >= 1, got '0'"),
    (lambda c, k, t: ["train", "--config", c, "--steps", "0"], r"argument --steps: steps must be an int >= 1, got 0$"),
    (lambda c, k, t: ["train", "--config", c, "--lr", "x"], r"argument --lr: expected a number, got 'x'"),
    (lambda c, k, t: ["train", "--config", c, "--lr", "11"], r"argument --lr: lr must be in \(0.0, 10.0\], got 11"),
    (lambda c, k, t: ["train", "--config", c, "--bpe-vocab", "9"], r"argument --bpe-vocab: .* >= 256, got 9"),
    (lambda c, k, t: ["train", "--config", c, "--mode", "recurrent"], r"argument --mode: invalid choice: 'recurrent'"),
    (
        lambda c, k, t: ["train", "--config", c, "--device", "foo"],
        r"argument --device: expected a torch device .*'foo'",
    ),
    (lambda c, k, t: ["generate", k, "--device", "cuda:99"], r"argument --device: .*'cuda:99'"),
    (lambda c, k, t: ["train", "--config", c, "--out", _a_file(t)], r"argument --out: expected a folder, got the file"),
    (lambda c, k, t: ["demo", "--out", _a_file(t) + "/sub"], r"argument --out: expected a folder, .*a-file' is a file"),
]


@pytest.mark.parametrize(("argv", "match"), USAGE_ERRORS, ids=[m[1][:48] for m in USAGE_ERRORS])
def test_bad_options_are_usage_errors_naming_the_option(argv, match, tiny, checkpoint, tmp_path, capsys, monkeypatch):
    from models import demo

    def never(*args, **kwargs):
        raise AssertionError(f"the demo ran with {args} {kwargs}")

    monkeypatch.setattr(demo, "run", never)
    code, out, err = run_main(argv(str(tiny), str(checkpoint), tmp_path), capsys)
    assert code == 2, err
    assert "Traceback" not in err and out == ""
    assert re.search(match, err.splitlines()[-1]), err


def test_device_cuda_without_cuda_is_a_usage_error(tiny, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = run_main(["train", "--config", str(tiny), "--device", "cuda"], capsys)
    assert code == 2 and "argument --device: CUDA is not available here (torch.cuda.is_available() is False)" in err


def test_a_read_only_out_folder_is_a_usage_error(tiny, tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.access(locked, os.W_OK):  # root ignores permissions: pretend, as a read-only file system would say
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == locked else real_access(p, mode))
    try:
        code, _, err = run_main(["train", "--config", str(tiny), "--out", str(locked / "run")], capsys)
    finally:
        locked.chmod(0o700)
    assert code == 2, err
    assert f"argument --out: cannot write to the folder {str(locked)!r}" in err and "Traceback" not in err


DATA_ERRORS = [
    ("", r"--data '.*empty\.txt' is empty"),
    ("abc", r"--data '.*empty\.txt' holds 3 bytes; seq_len=16 with val_fraction=0\.1 needs at least 170"),
]


@pytest.mark.parametrize(("text", "match"), DATA_ERRORS, ids=["empty", "tiny"])
def test_data_too_small_for_seq_len_is_named(text, match, tiny, tmp_path, capsys):
    data = tmp_path / "empty.txt"
    data.write_text(text)
    code, _, err = run_main(["train", "--config", str(tiny), "--data", str(data), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and re.search(match, err), err
    assert "Traceback" not in err


def test_seq_len_longer_than_the_corpus_is_named(tiny, tmp_path, capsys):
    long = tmp_path / "long.toml"
    long.write_text(TINY.replace("seq_len = 16", "seq_len = 100000"))
    code, _, err = run_main(["train", "--config", str(long), "--out", str(tmp_path / "o")], capsys)
    assert code == 2, err
    assert re.search(r"the embedded corpus .* holds [\d,]+ bytes; seq_len=100000 .* needs at least", err), err


def test_a_config_that_is_not_utf8_names_the_file(tmp_path, capsys):
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(TINY.replace("def ", "caf\xe9 ").encode("latin-1"))
    code, _, err = run_main(["train", "--config", str(bad)], capsys)
    assert code == 2 and "Traceback" not in err
    assert f"config file {str(bad)!r} is not UTF-8 text" in err and "byte 0xe9 at offset" in err


def test_an_unavailable_backend_is_named_before_training(tiny, tmp_path, capsys):
    registry = get_registry()
    missing = dataclasses.replace(
        registry.backends["retention"]["torch"], check_available=lambda: "pretend the torch backend is missing"
    )
    config = tmp_path / "torch.toml"
    config.write_text(TINY.replace("ffn_dim = 32", 'ffn_dim = 32\nbackend = "torch"'))
    with registry.temporary_backend(missing, override=True):
        code, _, err = run_main(["train", "--config", str(config), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "Traceback" not in err, err
    assert "layers[0] (retention): backend 'torch' is unavailable here: pretend the torch backend is missing" in err
    assert not (tmp_path / "o").exists(), "nothing is trained or written"


def test_generate_threads_and_tiny_temperature(checkpoint, capsys):
    before = torch.get_num_threads()
    argv = ["generate", str(checkpoint), "--prompt", "ab", "--max-new-tokens", "5", "--threads", "1"]
    code, out, err = run_main([*argv, "--temperature", "1e-45"], capsys)
    assert code == 0, err
    assert torch.get_num_threads() == 1
    torch.set_num_threads(before)
    code, greedy, _ = run_main([*argv, "--temperature", "0"], capsys)
    assert code == 0 and out == greedy, "a temperature that underflows samples the most likely token"


# --- help and version ---------------------------------------------------------------------------------------


def test_help_is_plain_text_with_defaults(capsys):
    for argv in (["--help"], ["generate", "--help"], ["train", "--help"], ["demo", "--help"]):
        code, out, _ = run_main(argv, capsys)
        assert code == 0 and "``" not in out, f"{argv}: reStructuredText in the help:\n{out}"
    _, out, _ = run_main(["generate", "--help"], capsys)
    options = out.split("options:", 1)[1]
    for option, text in [
        ("--prompt", "(default: 'The ')"),
        ("--max-new-tokens", "(default: 200)"),
        ("--temperature", "(default: 0.8)"),
        ("--top-k", "(default: all)"),
        ("--seed", "(default: 0)"),
        ("--device", "(default: cpu)"),
        ("--threads", "torch CPU threads"),
    ]:
        line = " ".join(options.split(option, 1)[1].split("\n  -", 1)[0].split())
        assert text in line, f"{option}: {line!r}"


def test_version(capsys):
    import mixers

    code, out, _ = run_main(["--version"], capsys)
    assert code == 0 and out == f"seqmixers {mixers.__version__}\n"


# --- pipes and Ctrl-C: real processes -------------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEQMIXERS_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def test_generate_into_a_closed_pipe_exits_quietly_with_141(checkpoint):
    """``seqmixers generate ... | head -c 10``: the reader goes away; no traceback, exit 128 + SIGPIPE."""
    argv = [sys.executable, "-m", "models", "generate", str(checkpoint), "--max-new-tokens", "100000", "--threads", "1"]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env()) as proc:
        assert len(proc.stdout.read(10)) == 10
        proc.stdout.close()  # as head does once it has its 10 bytes
        err = proc.stderr.read().decode()
        code = proc.wait(timeout=120)
    assert code == 141, err
    assert err == "", err


def test_ctrl_c_during_start_up_exits_130_without_a_traceback():
    """A KeyboardInterrupt while the console script imports torch (the slow part of start-up)."""
    script = textwrap.dedent(
        """
        import sys

        class Interrupt:
            def find_spec(self, name, path=None, target=None):
                if name == "torch":
                    raise KeyboardInterrupt
                return None

        sys.meta_path.insert(0, Interrupt())
        from models.cli import main  # what the console script does

        sys.exit(main(["generate", "model.safetensors"]))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=_env(), timeout=120, check=False
    )
    assert result.returncode == 130, result.stderr
    assert result.stderr == "seqmixers generate: interrupted\n"
