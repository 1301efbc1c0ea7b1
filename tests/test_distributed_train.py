"""Data-parallel training on ``torch.distributed`` (gloo, 2 processes on the CPU), and what a step computes.

Properties: DDP and FSDP2 over 2 ranks give the losses and final weights of the 1-process run on the same global
batch (windows, and packed documents with ``cu_seqlens``); gradient accumulation over micro-batches of uneven
token counts equals one batch (the loss is normalised by the whole step's count, not per micro-batch);
activation checkpointing changes nothing; bf16 trains close to fp32; a real ``torchrun`` run of the command
writes one loadable checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

import models
from models.config import ConfigError, ModelConfig, TrainConfig
from models.training import data as corpus
from models.training.loop import train
from tests.dist_helpers import train_on_ranks
from tests.models_helpers import tiny_run_file

MODEL = ModelConfig(
    d_model=32,
    n_layers=2,
    layers=[{"mixer": "retention", "conv_size": 4, "num_heads": 2}, {"mixer": "softmax_attention", "num_heads": 2}],
    ffn_dim=64,
)
# grad_clip far below the gradient norms: every step clips, so the norm must be the whole gradient's on every rank
# (under FSDP each rank holds a shard of it).
TRAIN = TrainConfig(
    steps=5, batch_size=4, seq_len=32, warmup_steps=2, eval_every=5, eval_batches=1, sample_tokens=0, grad_clip=0.05
)
DATA = corpus.default_corpus()[:60_000]
LINES = b"\n".join(b"line %d: " % i + b"x" * (5 + (i * 37) % 60) for i in range(400))  # uneven documents


def alone(train_config: TrainConfig, data: bytes = DATA) -> dict:
    result = train(MODEL, train_config, data=data, progress=False)
    return {"train_curve": result.train_curve, "val_curve": result.val_curve, "weights": result.model.state_dict()}


def assert_same_run(got: dict, want: dict, rtol: float) -> None:
    assert [s for s, _ in got["train_curve"]] == [s for s, _ in want["train_curve"]]
    torch.testing.assert_close(
        [v for _, v in got["train_curve"]], [v for _, v in want["train_curve"]], rtol=rtol, atol=0
    )
    torch.testing.assert_close([v for _, v in got["val_curve"]], [v for _, v in want["val_curve"]], rtol=rtol, atol=0)
    assert got["weights"].keys() == want["weights"].keys()
    for name, w in want["weights"].items():
        torch.testing.assert_close(got["weights"][name], w, rtol=rtol, atol=rtol, msg=name)


@pytest.mark.parametrize(("parallel", "documents"), [("ddp", "none"), ("fsdp", "lines")])
def test_two_ranks_train_as_one_process(tmp_path, parallel, documents):
    """Each rank computes half of every global batch; the losses, the schedule and the weights after 5 steps are
    those of one process on the whole batch (to float32 rounding: the gradients are summed in another order)."""
    tc = dataclasses.replace(TRAIN, documents=documents)
    data = DATA if documents == "none" else LINES
    assert_same_run(train_on_ranks(tmp_path, MODEL, tc, data, parallel), alone(tc, data), rtol=2e-4)


def test_accumulated_micro_batches_of_uneven_counts_equal_one_batch():
    """Packed documents give micro-batches with different numbers of counted targets: normalising each by its own
    count (a per-micro-batch mean) would weigh them wrongly; the step's loss and update equal one batch's."""
    tc = dataclasses.replace(TRAIN, documents="lines", batch_size=8)
    one = alone(tc, LINES)
    four = alone(dataclasses.replace(tc, accumulate=4), LINES)
    assert_same_run(four, one, rtol=1e-5)


def test_activation_checkpointing_changes_nothing():
    assert_same_run(alone(dataclasses.replace(TRAIN, checkpoint_activations=True)), alone(TRAIN), rtol=1e-6)


def test_bf16_trains_close_to_fp32():
    fp32, bf16 = alone(TRAIN), alone(dataclasses.replace(TRAIN, precision="bf16"))
    for (_, a), (_, b) in zip(fp32["train_curve"], bf16["train_curve"], strict=True):
        assert abs(a - b) < 0.05, (a, b)


def test_a_batch_that_does_not_split_over_ranks_and_micro_batches_is_refused():
    with pytest.raises(ConfigError, match=r"batch_size=4 must be a multiple of ranks x accumulate = 1 x 3 = 3"):
        train(MODEL, dataclasses.replace(TRAIN, accumulate=3), data=DATA, progress=False)


def test_torchrun_runs_the_command_with_fsdp(tmp_path):
    """``torchrun --nproc_per_node 2 -m models.cli train --parallel fsdp``: the model is sharded over 2 ranks,
    rank 0 alone prints and writes the whole model to one loadable file."""
    config = tiny_run_file(tmp_path / "tiny.toml", model={"n_layers": 2})
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"]
    command += ["models.cli", "train", "--config", str(config), "--out", str(out), "--parallel", "fsdp", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("model: ") == 1, "only rank 0 prints"
    model = models.load(out / "model.safetensors")
    assert model.num_parameters() > 0


def test_context_parallel_training_equals_one_process(tmp_path):
    """``context_parallel=2``: both ranks take the whole batch, each half of every sequence's time; the states
    pass between them and the gradients are summed, so the run is the 1-process run."""
    tc = dataclasses.replace(TRAIN, steps=3, eval_every=3)
    got = train_on_ranks(tmp_path, MODEL, dataclasses.replace(tc, context_parallel=2), DATA, "none", name="cp")
    assert_same_run(got, alone(tc), rtol=2e-4)


def test_context_parallel_is_refused_where_it_cannot_run():
    with pytest.raises(ConfigError, match=r"context_parallel=2: it must equal the number of ranks \(1\)"):
        train(MODEL, dataclasses.replace(TRAIN, context_parallel=2), data=DATA, progress=False)


def test_the_command_resumes_logs_plots_and_exports(tmp_path, capsys):
    """``train --save-every``, ``train --resume`` (configs from the saved state), the run log and its plot,
    and ``export`` of the training state to one file."""
    from models import cli
    from models.training.runlog import read_log

    config = tiny_run_file(tmp_path / "tiny.toml", steps=4)
    out = tmp_path / "run"
    base = ["train", "--config", str(config), "--out", str(out), "--quiet", "--log-every", "1"]
    assert cli.main([*base, "--save-every", "2", "--steps", "2"]) == 0
    assert cli.main(["train", "--resume", str(out), "--quiet", "--steps", "4"]) == 0
    err = capsys.readouterr().err
    assert "curves: " in err and (out / "curves.png").stat().st_size > 0
    assert [r["step"] for r in read_log(out / "log.jsonl")] == [0, 1, 2, 3, 4]
    assert all(r["loss"] is not None for r in read_log(out / "log.jsonl")[1:])
    assert cli.main(["export", str(out), "--out", str(tmp_path / "exported.safetensors")]) == 0
    assert models.load(tmp_path / "exported.safetensors").num_parameters() > 0
    assert cli.main(["train", "--resume", str(tmp_path / "nothing"), "--quiet"]) == 2
    assert "no training state in" in capsys.readouterr().err
