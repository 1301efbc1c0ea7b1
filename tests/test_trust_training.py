"""Trust at the seams of training (issue 21): a resumed run trains on the data it saved, refuses damaged or
edited training states, changed data and a second writer of its folder, cleans what killed writers left, and
says plainly what it did (no steps left, the ranks it ran on, where a non-finite loss came from)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from models import cli
from models.config import ConfigError, ModelConfig, TrainConfig
from models.training import data as corpus
from models.training import folder
from models.training import loop as training
from models.training import state as train_state
from models.training.parallel import Layout, World
from models.training.results import TrainingDiverged
from tests.models_helpers import one_thread  # noqa: F401  (autouse fixture)

MODEL = ModelConfig(
    d_model=16, n_layers=2, layers=["retention"], ffn_dim=16, mixer_options={"retention": {"num_heads": 2}}
)
TRAIN = TrainConfig(steps=4, batch_size=2, seq_len=16, warmup_steps=1, eval_every=2, eval_batches=1, sample_tokens=0)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "data.txt"
    path.write_bytes(corpus.default_corpus()[100_000:130_000])  # not the start of the embedded corpus
    return path


def run(out, tc=TRAIN, **kwargs):
    return training.train(MODEL, tc, out=out, progress=False, **kwargs)


def on(path, tc=TRAIN) -> TrainConfig:
    """``tc`` training on the file or folder ``path``."""
    return dataclasses.replace(tc, data=path)


def saved_run(tmp_path, text_file):
    """A run on ``text_file`` of the first 2 of ``TRAIN``'s 4 steps, whose training state is saved after step 2."""
    out = tmp_path / "run"
    run(out, dataclasses.replace(TRAIN, save_every=2, steps=2, data=text_file))
    return out


def curves_equal(a, b) -> bool:
    return a.train_curve == b.train_curve and a.val_curve == b.val_curve


# -- 1. a resumed run trains on the data it saved --------------------------------------------------------------------


def test_resume_without_data_trains_on_the_saved_source(tmp_path, text_file):
    whole = run(tmp_path / "whole", on(text_file))
    out = saved_run(tmp_path, text_file)
    resumed = run(out, resume=out)  # no data given: the saved source, not the embedded corpus
    assert curves_equal(resumed, whole)


def test_resume_refuses_changed_or_other_data_unless_allowed(tmp_path, text_file):
    out = saved_run(tmp_path, text_file)
    other = tmp_path / "other.txt"
    other.write_bytes(text_file.read_bytes()[::-1])
    with pytest.raises(train_state.ResumeError, match="trained on other data.*now .*other.txt"):
        run(out, on(other), resume=out)
    with pytest.raises(train_state.ResumeError, match=r"trained on other data.*now bytes given to train\(data=...\)"):
        training.train(MODEL, TRAIN, data=corpus.default_corpus(), out=out, progress=False, resume=out)
    with pytest.raises(train_state.ResumeError, match="train.documents: saved 'none', now 'lines'"):
        run(out, dataclasses.replace(TRAIN, documents="lines"), resume=out)
    with text_file.open("ab") as f:
        f.write(b"one more line\n")
    with pytest.raises(train_state.ResumeError, match=f"{text_file} changed size: 30,000 -> 30,014 bytes"):
        run(out, resume=out)
    resumed = run(out, resume=out, allow_new_data=True)
    assert [s for s, _ in resumed.val_curve] == [0, 2, 4]
    assert resumed.best_step == 4, "the best of the old data was forgotten: the new data's is step 4's"


def test_a_missing_source_is_named(tmp_path, text_file):
    out = saved_run(tmp_path, text_file)
    text_file.rename(tmp_path / "moved.txt")
    with pytest.raises(OSError, match="data.txt"):
        run(out, resume=out)


def test_the_command_resumes_on_its_saved_data_and_prints_an_exact_resume_command(tmp_path, text_file, capsys):
    out = saved_run(tmp_path, text_file)
    assert cli.main(["train", "--resume", str(out), "--steps", "4", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert f"data: {text_file}, as the run trained on it" in err and "embedded" not in err
    assert train_state.read(out).train.data == str(text_file.resolve()), "the resume kept the run's data"
    args = cli.parser().parse_args(["train", "--resume", str(out), "--device", "cpu", "--threads", "2"])
    assert cli._resume_command(args, out) == f"seqmixers train --resume {out} --threads 2"
    ddp = cli.parser().parse_args(["train", "--config", "x", "--parallel", "ddp"])
    env = {"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}
    with pytest.MonkeyPatch.context() as m:
        for k, v in env.items():
            m.setenv(k, v)
        # --parallel ddp is in the run's train config, which its state holds
        assert (
            cli._resume_command(ddp, out)
            == f"torchrun --nnodes 2 --nproc_per_node 2 -m models.cli train --resume {out}"
        )


# -- 2, 3. the training state is checked whole before anything is loaded -------------------------------------------


def flip_a_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda s: flip_a_byte(next(s.glob("*.distcp"))), r"the bytes of .*__0_0.distcp differ"),
        (
            lambda s: next(s.glob("*.distcp")).write_bytes(next(s.glob("*.distcp")).read_bytes()[:100]),
            r"holds 100 bytes",
        ),
        (lambda s: (s / ".metadata").unlink(), r"\.metadata is missing"),
        (lambda s: (s / "checksums.json").unlink(), r"has no checksums.json"),
        (lambda s: (s / "checksums.json").write_text("{"), r"checksums.json is unreadable"),
    ],
    ids=["flipped-byte", "truncated-shard", "missing-metadata", "no-checksums", "bad-checksums"],
)
def test_a_damaged_training_state_is_refused_by_name(tmp_path, text_file, damage, message):
    out = saved_run(tmp_path, text_file)
    damage(out / train_state.STATE)
    with pytest.raises(train_state.ResumeError, match=message):
        run(out, resume=out)


def test_the_command_refuses_a_damaged_state_with_one_line(tmp_path, text_file, capsys):
    out = saved_run(tmp_path, text_file)
    flip_a_byte(next((out / train_state.STATE).glob("*.distcp")))
    assert cli.main(["train", "--resume", str(out), "--steps", "4", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("seqmixers train: error: the training state in") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def edit_meta(state, **fields) -> None:
    """Edit ``meta.json`` and re-sign it, as a hand edit with recomputed checksums would."""
    meta = json.loads((state / "meta.json").read_text())
    meta.update(fields)
    (state / "meta.json").write_text(json.dumps(meta))
    train_state.write_checksums(state)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"step": -5}, r"step must be an int in \[0, train.steps = 2\], got -5"),
        ({"step": 3}, r"step must be an int in \[0, train.steps = 2\], got 3"),
        ({"step": 2.0}, r"step must be an int .* got 2.0 \(float\)"),
        ({"ranks": 0}, r"ranks must be an int >= 1"),
        ({"parallel": "zero"}, r"parallel must be one of"),
        ({"train_curve": [[1, 4.0]]}, r"train_curve must hold one loss per step done \(2\)"),
        ({"train_curve": [[2, 4.0], [1, 4.0]]}, r"train_curve: steps must rise"),
        ({"val_curve": [[0, "x"], [2, 4.0]]}, r"val_curve: the loss at step 0 must be a finite number"),
        ({"best_step": 1}, r"best_step and best_val_loss must name a point of val_curve"),
        ({"best_val_loss": 0.5}, r"best_step and best_val_loss must name a point of val_curve"),
        ({"tokens": -1}, r"tokens must be an int >= 0"),
        ({"train_s": float("nan")}, r"train_s must be a finite number"),
        ({"model": {"d_model": -1}}, r"d_model"),
        ({"data": {"kind": "path"}}, r"data must hold the fields"),
        ({"format": 1}, r"format must be 2"),
        ({"extra": 1}, r"expected the fields .*; missing \[\], unknown \['extra'\]"),
    ],
)
def test_every_field_of_meta_json_is_checked(tmp_path, text_file, fields, message):
    out = saved_run(tmp_path, text_file)
    edit_meta(out / train_state.STATE, **fields)
    with pytest.raises(train_state.ResumeError, match="meta.json: " + message):
        train_state.read(out)


# -- 8. resume messages that match what happened -----------------------------------------------------------------


def test_resume_with_no_steps_left_is_refused(tmp_path, text_file, capsys):
    out = saved_run(tmp_path, text_file)
    assert cli.main(["train", "--resume", str(out), "--steps", "2", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "has done 2 steps and this resume asks for 2 in all: nothing is left to train" in err
    assert "done: val loss" not in err


def test_resume_into_another_folder_takes_the_run_with_it(tmp_path, text_file, capsys):
    out, new = saved_run(tmp_path, text_file), tmp_path / "continued"
    assert cli.main(["train", "--resume", str(out), "--out", str(new), "--steps", "3", "--quiet"]) == 0
    err = capsys.readouterr().err
    best = err.split(" best ")[1].split(" (")[0]
    assert (new / "best.safetensors").is_file() and best == str(new / "best.safetensors")
    assert (new / "model.safetensors").is_file() and (new / "log.jsonl").is_file()
    # a folder that holds another run's checkpoints is not overwritten without --force
    other = saved_run(tmp_path / "b", text_file)
    assert cli.main(["train", "--resume", str(out), "--out", str(other), "--steps", "3", "--quiet"]) == 2
    assert "already holds a checkpoint" in capsys.readouterr().err


# -- 13. clear errors: parallelism outside torchrun, two runs into one folder ---------------------------------------


def test_ddp_or_fsdp_outside_torchrun_says_how_to_launch(tmp_path, capsys):
    for parallel in ("ddp", "fsdp"):
        code = cli.main(["train", "--config", "retnet-tiny", "--parallel", parallel, "--out", str(tmp_path / parallel)])
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err
        assert f"--parallel {parallel} trains over several processes" in err and "torchrun --nproc_per_node" in err


def test_a_second_run_into_a_locked_folder_is_told_who_holds_it(tmp_path, text_file):
    out = tmp_path / "run"
    with folder.lock(out, World()):
        with pytest.raises(folder.RunLocked, match=f"in use by pid {os.getpid()} on "):
            run(out, on(text_file))
    run(out, on(text_file))  # released: a run goes on


def test_the_lock_is_held_across_processes(tmp_path, text_file):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import fcntl,sys,time; f=open({str(out / '.lock')!r},'a+'); "
         "fcntl.flock(f, fcntl.LOCK_EX); f.write('pid 4242 holder'); f.flush(); print('locked', flush=True); "
         "sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(folder.RunLocked, match="in use by pid 4242 holder"):
            run(out, on(text_file))
    finally:
        holder.communicate("")


# -- 15. stale temporaries of killed writers are removed at the start ------------------------------------------------


def test_stale_temporaries_of_the_run_folder_are_removed_at_start(tmp_path, text_file):
    out = tmp_path / "run"
    (out / "cache").mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has ended
    from models.checkpoint_format import _host

    stale = [
        out / f".best.safetensors.{_host()}.{pid}.tmp",
        out / f".model.safetensors.{pid}.tmp",
        out / "cache" / f".tokens.bin.{pid}.abcd.tmp",
    ]
    for path in stale:
        path.write_bytes(b"partial")
    (out / "train_state.tmp").mkdir()
    live = out / f".best.safetensors.{_host()}.{os.getppid()}.tmp"  # a live process's: left alone
    live.write_bytes(b"being written")
    run(out, dataclasses.replace(TRAIN, steps=1, eval_every=1, data=text_file))
    assert not any(p.exists() for p in stale) and not (out / "train_state.tmp").exists()
    assert live.exists()


# -- 14. a non-finite loss names the layer and backend it came from ------------------------------------------------


def test_a_backend_that_makes_nan_is_named_when_training_diverges(tmp_path):
    from mixers.backends import torch_retention
    from mixers.registry import get_registry

    def poisoned(*args, **kwargs):
        o, state = torch_retention.retention(*args, **kwargs)
        return o * float("nan"), state

    model = dataclasses.replace(MODEL, layers=["retention", {"mixer": "retention", "backend": "poisoned"}])
    with get_registry().temporary_backend("retention", "poisoned", poisoned, plugin="nan_tests"):
        with pytest.raises(TrainingDiverged) as caught:
            training.train(model, TRAIN, data=corpus.default_corpus()[:20_000], progress=False)
    message = str(caught.value)
    assert "the first non-finite output is layer 1's mixer 'retention'" in message
    assert "backend 'poisoned' of op 'retention'" in message and "nan_tests" in message
    assert "best inf" not in message and "step None" not in message


# -- 16. a BPE run takes its vocabulary size from the tokenizer ----------------------------------------------------


def test_bpe_sets_vocab_size_from_the_tokenizer_unless_the_config_chose_one(tmp_path, text_file):
    pytest.importorskip("tokenizers")
    tc = dataclasses.replace(TRAIN, steps=1, eval_every=1, tokenizer="bpe", bpe_vocab=300)
    result = run(tmp_path / "a", on(text_file, tc))  # MODEL has the byte default, 256
    assert result.model.config.vocab_size == result.tokenizer.vocab_size > 256
    chosen = dataclasses.replace(MODEL, vocab_size=512)
    kept = training.train(chosen, on(text_file, tc), out=tmp_path / "b", progress=False)
    assert kept.model.config.vocab_size == 512
    too_small = dataclasses.replace(MODEL, vocab_size=260)
    with pytest.raises(ConfigError, match="vocab_size=260 .* smaller than the BPE tokenizer's"):
        training.train(too_small, on(text_file, tc), out=tmp_path / "c", progress=False)


# -- 17. the command says its defaults and how it ran --------------------------------------------------------------


def test_every_train_option_shows_its_default():
    train = cli.parser()._subparsers._group_actions[0].choices["train"]
    missing = [
        a.option_strings[0]
        for a in train._actions
        if a.option_strings and a.help and "default" not in a.help and a.nargs != 0 and a.dest != "config"
    ]
    assert missing == [], f"options whose help does not give their default: {missing}"


def test_a_distributed_run_says_on_how_many_ranks_and_with_what():
    world = World(rank=0, size=4)
    tc = dataclasses.replace(TRAIN, batch_size=16, accumulate=2)
    assert Layout(world, "ddp").note(tc) == (
        "parallel: DDP on 4 ranks (?, cpu); each step's 16 rows: 4 ranks x 2 rows x 2 micro-batch(es)"
    )
