"""Resumable training: the whole state (model, optimizer, RNG of every rank, data position, step, curves) is saved
with ``torch.distributed.checkpoint`` every ``save_every`` steps and on SIGINT/SIGTERM, and ``resume`` goes on.

Properties: with one process, a run interrupted by SIGTERM after step k and resumed is bit-identical to the
uninterrupted run (weights, losses, validation); so is a run resumed from a periodic save; with 2 ranks (DDP, and
FSDP2 with a sharded state) a resumed run equals the uninterrupted one within float tolerance; a state from
another setup is refused by name; a training state converts to the single-file checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import signal

import pytest
import torch

import models
from models.config import ModelConfig, TrainConfig
from models.training import data as corpus
from models.training import loop as training
from models.training import state as train_state
from tests.dist_helpers import train_on_ranks

MODEL = ModelConfig(
    d_model=16,
    n_layers=2,
    layers=[{"mixer": "retention", "conv_size": 4, "num_heads": 2}, {"mixer": "softmax_attention", "num_heads": 2}],
    ffn_dim=32,
)
TRAIN = TrainConfig(steps=8, batch_size=4, seq_len=16, warmup_steps=2, eval_every=4, eval_batches=1, sample_tokens=0)
DATA = corpus.default_corpus()[:40_000]


def run(out, tc=TRAIN, **kwargs):
    return training.train(MODEL, tc, data=DATA, out=out, progress=False, **kwargs)


def assert_identical(got, want) -> None:
    assert got.train_curve == want.train_curve
    assert got.val_curve == want.val_curve
    for (name, a), (_, b) in zip(got.model.state_dict().items(), want.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), f"{name} differs"


@pytest.fixture
def sigterm_safety_net():
    """If training failed to catch SIGTERM, its default action would kill pytest: fail the test instead."""

    def caught(signum, frame):
        raise AssertionError("SIGTERM reached the handler from before training")

    before = signal.signal(signal.SIGTERM, caught)
    yield
    signal.signal(signal.SIGTERM, before)


def test_sigterm_then_resume_is_bit_identical(tmp_path, monkeypatch, sigterm_safety_net):
    whole = run(tmp_path / "whole")
    draw, calls = corpus.TokenCache.random_window_starts, []

    def draw_and_terminate(*args):
        calls.append(1)
        if len(calls) == 3:  # during step 3's batch: the step completes, then the run saves and stops
            os.kill(os.getpid(), signal.SIGTERM)
        return draw(*args)

    monkeypatch.setattr(corpus.TokenCache, "random_window_starts", draw_and_terminate)
    out = tmp_path / "stopped"
    with pytest.raises(training.Interrupted) as caught:
        run(out)
    assert caught.value.step == 3 and caught.value.signal_name == "SIGTERM"
    assert train_state.read_meta(out / train_state.STATE)["step"] == 3
    monkeypatch.setattr(corpus.TokenCache, "random_window_starts", draw)
    assert_identical(run(out, resume=out), whole)


def test_resuming_a_periodic_save_is_bit_identical(tmp_path):
    whole = run(tmp_path / "whole")
    out = tmp_path / "saved"
    run(out, dataclasses.replace(TRAIN, save_every=5))  # saves after step 5 only
    assert train_state.read_meta(out / train_state.STATE)["step"] == 5
    assert_identical(run(tmp_path / "resumed", resume=out), whole)


def test_two_ranks_resume_a_sharded_state_as_the_uninterrupted_run(tmp_path):
    """FSDP2 over 2 ranks saves each rank's shards and resumes from them; the run ends as the uninterrupted one
    (to float32 rounding: 2 ranks sum gradients in another order than 1 process, see test_distributed_train)."""
    whole = run(tmp_path / "whole")
    out = tmp_path / "saved"
    train_on_ranks(tmp_path, MODEL, dataclasses.replace(TRAIN, save_every=5), DATA, "fsdp", name="first", out=out)
    assert len(list((out / train_state.STATE).glob("*.distcp"))) == 2, "one file of shards per rank"
    resumed = train_on_ranks(tmp_path, MODEL, TRAIN, DATA, "fsdp", name="resumed", resume=out)
    assert [s for s, _ in resumed["train_curve"]] == list(range(1, TRAIN.steps + 1))
    torch.testing.assert_close(resumed["train_curve"], whole.train_curve, rtol=2e-4, atol=0)
    for name, w in whole.model.state_dict().items():
        torch.testing.assert_close(resumed["weights"][name], w, rtol=2e-4, atol=2e-4, msg=name)


def test_a_state_from_another_setup_is_refused(tmp_path):
    out = tmp_path / "saved"
    run(out, dataclasses.replace(TRAIN, save_every=4))
    other = dataclasses.replace(MODEL, d_model=32)
    with pytest.raises(train_state.ResumeError, match="another setup: model"):
        training.train(other, dataclasses.replace(TRAIN, steps=9), data=DATA, progress=False, resume=out)
    with pytest.raises(train_state.ResumeError, match="no training state in"):
        run(None, resume=tmp_path / "nothing")


def test_a_training_state_converts_to_the_single_file_checkpoint(tmp_path):
    out = tmp_path / "saved"
    result = run(out, dataclasses.replace(TRAIN, save_every=8))
    path = train_state.export(out, tmp_path / "exported.safetensors")
    model = models.load(path)
    for (name, a), (_, b) in zip(model.state_dict().items(), result.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
