"""Generation and the command at the seams (issue 21): the states' memory is estimated and refused before anything
is allocated; a non-UTF-8 prompt and a corrupt tokenizer are clear errors; the prompt dtype error names the dtype;
the top-level help wraps to the terminal; a plugin raising KeyboardInterrupt is a broken plugin, not a Ctrl-C;
``generate --compile`` reports its compilation apart from the time per token."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from models import build_model
from models import lm as lm_module
from models.lm import LanguageModel, NotEnoughMemory, state_nbytes
from tests.fake_plugins import _dist_info, write_interrupt_distribution
from tests.models_helpers import one_thread, run_main, tiny_config  # noqa: F401  (one_thread: autouse)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(tiny_config(["retention", "softmax_attention"], vocab_size=256)).eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model) -> Path:
    return model.save(tmp_path_factory.mktemp("ckpt") / "model.safetensors")


def one_clear_error(code: int, out: str, err: str) -> str:
    assert code == 2, (code, err)
    assert out == "" and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    return err


# -- item 9: the states' memory, before allocating ---------------------------------------------------------------


def test_the_estimate_is_what_init_states_allocates(model):
    for rows, max_len in [(1, 7), (3, 50)]:
        assert model.state_memory(rows, max_len) == state_nbytes(model.init_states(rows, max_len=max_len))
    assert model.state_memory(1, 10**6) > model.state_memory(1, 10**3), "the KV cache grows with max_len"


def test_a_kv_cache_larger_than_the_memory_is_refused_before_allocating(model):
    """``max_new_tokens = 1e11``: a ~TB KV cache was an allocation traceback (a 7.8 GB one filled the memory)."""
    with pytest.raises(NotEnoughMemory, match=r"generating needs [0-9.,]+ TiB .* but only [0-9.,]+ [KMGT]iB is "):
        model.generate([1, 2, 3], 10**11)


@pytest.fixture
def one_mib(monkeypatch):
    """1 MiB available: the refusal depends on the device's memory, not on a fixed limit."""
    seen = []
    monkeypatch.setattr(lm_module, "available_memory", lambda device: seen.append(device) or 1 << 20)
    return seen


def test_generate_and_stream_refuse_what_does_not_fit_in_the_memory_available(model, one_mib):
    fits = 1000  # about 80 KiB of KV cache
    assert model.state_memory(1, 3 + fits) < 1 << 20 < model.state_memory(1, 3 + 20_000)
    model.generate([1, 2, 3], 4)
    message = r"needs [0-9.]+ MiB for the layers' states \(1 row, KV caches preallocated for 20,003 tokens\), but only "
    with pytest.raises(NotEnoughMemory, match=message + r"1\.0 MiB is available on cpu: lower max_new_tokens"):
        model.generate([1, 2, 3], 20_000)
    with pytest.raises(NotEnoughMemory):
        model.stream([1, 2, 3], 20_000)  # at the call, not at the first token
    assert one_mib and all(torch.device(d).type == "cpu" for d in one_mib)


def test_batched_generation_and_beam_search_count_every_row_and_copy(model, monkeypatch):
    prompts, budget, beams = [[1, 2], [3]], 3, 2
    beam_needs = 2 * model.state_memory(len(prompts) * beams, 2 + budget)  # beams, copied by every reorder
    monkeypatch.setattr(lm_module, "available_memory", lambda device: beam_needs - 1)
    assert model.state_memory(len(prompts), 2 + budget) < beam_needs - 1, "the prompts' rows alone fit"
    with pytest.raises(NotEnoughMemory, match=r"\(4 rows x 2 copies, KV caches preallocated for 5 tokens\)"):
        model.beam_search(prompts, budget, num_beams=beams)
    monkeypatch.setattr(lm_module, "available_memory", lambda device: beam_needs)
    assert len(model.beam_search(prompts, budget, num_beams=beams)) == 2
    batch_needs = 2 * model.state_memory(len(prompts), 2 + budget)  # rows, copied when a finished row is dropped
    monkeypatch.setattr(lm_module, "available_memory", lambda device: batch_needs - 1)
    with pytest.raises(NotEnoughMemory, match=r"\(2 rows x 2 copies, "):
        model.generate_batch(prompts, budget)
    with pytest.raises(NotEnoughMemory):
        model.init_states(1000, max_len=1000)  # the public way to preallocate is checked too


def test_cli_refuses_a_kv_cache_that_does_not_fit(checkpoint, capsys):
    err = one_clear_error(*run_main(["generate", str(checkpoint), "--max-new-tokens", "100000000000"], capsys))
    assert re.search(r"error: generating needs .* TiB .* available on cpu: lower max_new_tokens \(--max-new-", err)


def test_available_memory_reads_the_system(monkeypatch):
    available = lm_module.available_memory("cpu")
    assert available is not None and 0 < available
    assert lm_module.available_memory("meta") is None


# -- item 13: clear errors for the prompt and the tokenizer ------------------------------------------------------


def test_a_prompt_that_is_not_utf8_is_a_usage_error(checkpoint, capsys):
    """Bytes that are not UTF-8 reach ``sys.argv`` as lone surrogates (PEP 383), which broke the encoder."""
    prompt = b"caf\xe9 au lait".decode("utf-8", "surrogateescape")
    code, out, err = run_main(["generate", str(checkpoint), "--prompt", prompt], capsys)
    assert code == 2 and out == "" and "Traceback" not in err, err
    last = err.splitlines()[-1]  # under argparse's usage lines, as every usage error
    assert "generate: error: argument --prompt: expected UTF-8 text, got b'\\xe9' at character 3" in last, err


def test_a_prompt_that_is_not_utf8_in_a_real_process(checkpoint):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEQMIXERS_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    argv = [sys.executable, "-m", "models", "generate", os.fsencode(checkpoint), "--prompt", b"\xff\xfe ok"]
    result = subprocess.run(argv, capture_output=True, env=env, timeout=120, check=False)
    assert result.returncode == 2 and result.stdout == b"", result.stderr
    assert result.stderr.decode().endswith(
        "expected UTF-8 text, got b'\\xff\\xfe' at character 0, which is not (convert it, e.g. with iconv)\n"
    ), result.stderr


def test_a_corrupt_tokenizer_beside_the_checkpoint_is_named(checkpoint, capsys):
    tokenizer = checkpoint.parent / "tokenizer.json"
    tokenizer.write_text('{"version": "1.0", "model": ')
    try:
        err = one_clear_error(*run_main(["generate", str(checkpoint), "--max-new-tokens", "2"], capsys))
    finally:
        tokenizer.unlink()
    assert f"error: {tokenizer} beside the checkpoint is not a readable tokenizer (" in err, err


# -- item 15: the prompt dtype message; the help; a plugin's KeyboardInterrupt ------------------------------------


@pytest.mark.parametrize(
    ("prompt", "why"),
    [
        (torch.tensor([True, False]), "True and False are not token ids"),
        (torch.tensor([1 + 2j]), "a complex 1\\+2j is not a token"),
        (torch.tensor([1.5]), "a float 1.5 is not a token"),
    ],
    ids=["bool", "complex", "float"],
)
def test_the_prompt_dtype_error_fits_the_dtype(model, prompt, why):
    with pytest.raises(TypeError, match=rf"got dtype {prompt.dtype} \({why}; convert explicitly") as caught:
        model.generate(prompt, 1)
    if prompt.dtype != torch.float32:
        assert "float" not in str(caught.value)


@pytest.mark.parametrize("width", [60, 80, 120])
def test_the_top_level_help_wraps_evenly_to_the_terminal(width, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", str(width))
    code, out, _ = run_main(["--help"], capsys)
    assert code == 0
    lines = out.split("\n\n", 1)[1].splitlines()  # after the usage, which argparse cannot break in its choices
    too_long = [line for line in lines if len(line) > width]
    assert not too_long, too_long
    description = out.split("\n\n")[2]  # after the usage and the first line: the commands, one bullet each
    items = re.split(r"\n(?=- )", description)
    assert len(items) == 8 and all(item.startswith("- seqmixers") or "Plugins" in item for item in items), items
    for item in items:  # filled greedily: no line could have taken the next line's first word
        rows = item.splitlines()
        for row, following in zip(rows, rows[1:], strict=False):
            assert following.startswith("  ") and not following.startswith("   "), item
            assert len(row) + 1 + len(following.split()[0]) > width - 2, f"{row!r} could hold more:\n{item}"


def _env(pythonpath: Path, plugins: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEQMIXERS_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(pythonpath), str(ROOT), env.get("PYTHONPATH")) if p)
    env["SEQMIXERS_PLUGINS"] = plugins
    return env


def test_seqmixers_list_reports_a_plugins_keyboard_interrupt_and_exits_0(tmp_path):
    write_interrupt_distribution(tmp_path)
    command = [sys.executable, "-m", "mixers", "list"]
    result = subprocess.run(
        command, capture_output=True, text=True, env=_env(tmp_path, "fake_interrupt"), timeout=120, check=False
    )
    assert result.returncode == 0, (result.returncode, result.stderr)
    assert "fake_interrupt" in result.stdout and "KeyboardInterrupt" in result.stdout, result.stdout


def test_a_real_ctrl_c_while_a_plugin_imports_still_stops_the_command(tmp_path):
    """The user's Ctrl-C (SIGINT) during a slow plugin import is not a broken plugin: it ends the command, 130."""
    (tmp_path / "slowplug.py").write_text(
        textwrap.dedent(
            """
            import os, signal, time
            os.kill(os.getpid(), signal.SIGINT)  # as the user pressing Ctrl-C during this import
            time.sleep(30)
            """
        )
    )
    _dist_info(tmp_path, "fakeplug-slow", "0.9", {"fake_slow": "slowplug"})
    command = [sys.executable, "-m", "mixers", "list"]
    result = subprocess.run(
        command, capture_output=True, text=True, env=_env(tmp_path, "fake_slow"), timeout=120, check=False
    )
    assert result.returncode == 130, (result.returncode, result.stdout, result.stderr)
    assert result.stderr == "seqmixers list: interrupted\n"


# -- item 17: --compile reports the compilation apart --------------------------------------------------------------


def test_generate_compile_reports_the_compilation_apart(checkpoint, capsys, monkeypatch):
    """The first call of the compiled step compiles (here: 0.6 s more); the time per token leaves it out."""

    def compiled_step(self, mode):
        calls = []

        def step(token, states):
            if not calls:
                time.sleep(0.6)  # the compilation
            calls.append(1)
            return self._decode_step(token, states)

        return step

    monkeypatch.setattr(LanguageModel, "_compiled_step", compiled_step)
    argv = ["generate", str(checkpoint), "--max-new-tokens", "12", "--compile", "--threads", "1"]
    code, out, err = run_main(argv, capsys)
    assert code == 0, err
    found = re.search(r"\[12 tokens in ([0-9.]+) s, ([0-9.]+) ms/token; compile ([0-9.]+) s\]", err)
    assert found, err
    total, per_token, compiling = float(found[1]), float(found[2]) / 1e3, float(found[3])
    assert compiling >= 0.6 and per_token < 0.6 / 11, (total, per_token, compiling)
    assert per_token == pytest.approx((total - compiling) / 11, abs=1.5e-3)  # printed to 0.01 s
