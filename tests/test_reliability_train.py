"""Training never loses work: a run folder holding a checkpoint is not overwritten without ``--force``, the
best checkpoint is kept beside the last one and a run whose validation loss runs away stops with exit code
3, and an interrupted run (SIGINT, SIGTERM) saves what it has before it exits."""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
from pathlib import Path

import pytest

from models import cli, read_header
from models.config import load_run_config
from models.training import data as corpus
from models.training import loop as training
from models.training.interrupts import Interrupted
from models.training.results import TrainingDiverged
from tests.models_helpers import (
    one_thread,  # noqa: F401  (autouse fixture)
    tiny_run_file,
)


@pytest.fixture
def tiny(tmp_path) -> Path:
    return tiny_run_file(tmp_path / "tiny.toml", steps=4)


def test_a_second_run_does_not_overwrite_a_checkpoint_without_force(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--config", str(tiny), "--out", str(out), "--quiet"]) == 0
    trained = (out / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert cli.main(["train", "--config", str(tiny), "--out", str(out), "--seed", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{out} already holds a checkpoint (model.safetensors: step 4, val loss " in err
    assert "--force" in err and "--out" in err and "seqmixers generate" in err
    assert (out / "model.safetensors").read_bytes() == trained, "the trained checkpoint is untouched"
    assert cli.main(["train", "--config", str(tiny), "--out", str(out), "--seed", "1", "--quiet", "--force"]) == 0
    assert (out / "model.safetensors").read_bytes() != trained


def fake_validation(monkeypatch, losses: list[float]) -> None:
    """Validation losses in this order, instead of measured ones."""
    it = iter(losses)
    monkeypatch.setattr(training, "evaluate", lambda *args: next(it))


def test_best_checkpoint_is_kept_beside_the_last_one(tiny, tmp_path, monkeypatch):
    model_config, train_config = load_run_config(tiny)
    fake_validation(monkeypatch, [5.0, 4.0, 4.5])
    result = training.train(model_config, train_config, data=corpus.default_corpus(), out=tmp_path, progress=False)
    assert result.checkpoint == tmp_path / "model.safetensors" and result.best == tmp_path / "best.safetensors"
    assert read_header(result.checkpoint)[1] | {"train": None} == {
        "step": 4,
        "val_loss": 4.5,
        "best_step": 2,
        "best_val_loss": 4.0,
        "train": None,
    }
    assert read_header(result.best)[1]["step"] == 2 and read_header(result.best)[1]["val_loss"] == 4.0


@pytest.mark.parametrize("runaway", [4.0 + training.DIVERGENCE_MARGIN + 0.01, float("inf"), float("nan")])
def test_a_run_away_validation_loss_stops_the_run_and_keeps_the_good_checkpoints(tiny, tmp_path, monkeypatch, runaway):
    model_config, train_config = load_run_config(tiny)
    fake_validation(monkeypatch, [5.0, 4.0, runaway])
    with pytest.raises(TrainingDiverged, match=r"at step 4: validation loss .* best 4\.000 \(step 2\)"):
        training.train(model_config, train_config, data=corpus.default_corpus(), out=tmp_path, progress=False)
    assert read_header(tmp_path / "model.safetensors")[1]["step"] == 2, "the diverged weights are not saved"
    assert read_header(tmp_path / "best.safetensors")[1]["step"] == 2


def test_a_rise_within_the_margin_is_not_divergence(tiny, tmp_path, monkeypatch):
    model_config, train_config = load_run_config(tiny)
    fake_validation(monkeypatch, [5.0, 4.0, 4.0 + training.DIVERGENCE_MARGIN - 0.01])
    training.train(model_config, train_config, data=corpus.default_corpus(), out=tmp_path, progress=False)
    assert read_header(tmp_path / "model.safetensors")[1]["step"] == 4


def test_lr_10_exits_3_with_the_best_checkpoint_kept(tiny, tmp_path, capsys):
    """The issue's run, on a tiny model: lr=10 diverges (finite or not); the command says so and exits 3."""
    config = tiny_run_file(tmp_path / "hot.toml", steps=40, lr=10.0, warmup_steps=1)
    out = tmp_path / "run"
    assert cli.main(["train", "--config", str(config), "--out", str(out), "--quiet"]) == 3
    err = capsys.readouterr().err
    assert "seqmixers train: error: training diverged at step" in err and "done" not in err
    assert f"best checkpoint {out / 'best.safetensors'}" in err
    best, last = read_header(out / "best.safetensors")[1], read_header(out / "model.safetensors")[1]
    diverged_at = int(err.split("diverged at step ")[1].split(":")[0])
    assert best["val_loss"] == best["best_val_loss"] < 6.5 and last["step"] < diverged_at, "no diverged weights kept"


def interrupt_at_batch(monkeypatch, n: int, signum: int) -> list[int]:
    """Send the process ``signum`` itself (a real signal, to the real handler) while step ``n`` draws its
    batch: deterministic, unlike a signal from outside, and no process start (torch's import costs seconds)."""
    sample, calls = corpus.TokenCache.random_window_starts, []

    def sample_and_interrupt(*args):
        calls.append(1)
        if len(calls) == n:
            os.kill(os.getpid(), signum)
        return sample(*args)

    monkeypatch.setattr(corpus.TokenCache, "random_window_starts", sample_and_interrupt)
    return calls


@pytest.fixture
def sigterm_safety_net():
    """If training failed to catch SIGTERM, its default action would kill pytest: fail the test instead."""

    def caught(signum, frame):
        raise AssertionError("SIGTERM reached the handler from before training")

    before = signal.signal(signal.SIGTERM, caught)
    yield caught
    signal.signal(signal.SIGTERM, before)


@pytest.mark.skipif(sys.platform == "win32", reason="os.kill there terminates the process")
def test_sigint_during_training_saves_before_raising(tiny, tmp_path, monkeypatch, sigterm_safety_net):
    """SIGINT in the middle of step 3: the step completes, its model is saved with its step, and the run
    raises ``Interrupted`` (a ``KeyboardInterrupt``) rather than losing the steps since the last validation."""
    model_config, train_config = load_run_config(tiny)
    calls = interrupt_at_batch(monkeypatch, 3, signal.SIGINT)
    before = signal.getsignal(signal.SIGINT)
    train_config = dataclasses.replace(train_config, steps=100, eval_every=100)
    with pytest.raises(Interrupted) as caught:
        training.train(model_config, train_config, data=corpus.default_corpus(), out=tmp_path, progress=False)
    assert isinstance(caught.value, KeyboardInterrupt)
    assert caught.value.signum == signal.SIGINT and caught.value.step == 3 and len(calls) == 3
    info = read_header(tmp_path / "model.safetensors")[1]
    assert info["step"] == 3 and info["interrupted"] == "SIGINT" and info["last_val_step"] == 0
    assert read_header(tmp_path / "best.safetensors")[1]["step"] == 0, "best: validated models only"
    assert signal.getsignal(signal.SIGINT) is before and signal.getsignal(signal.SIGTERM) is sigterm_safety_net


@pytest.mark.skipif(sys.platform == "win32", reason="os.kill there terminates the process")
def test_sigterm_to_the_command_saves_and_exits_143(tiny, tmp_path, monkeypatch, capsys, sigterm_safety_net):
    interrupt_at_batch(monkeypatch, 2, signal.SIGTERM)
    out = tmp_path / "run"
    assert cli.main(["train", "--config", str(tiny), "--out", str(out), "--steps", "100", "--quiet"]) == 143
    err = capsys.readouterr().err
    assert f"seqmixers train: interrupted by SIGTERM after step 2; saved {out / 'model.safetensors'}" in err
    assert "done" not in err
    info = read_header(out / "model.safetensors")[1]
    assert info["interrupted"] == "SIGTERM" and info["step"] == 2 and info["last_val_step"] == 2
