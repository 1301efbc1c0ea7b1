"""The run log (models/runlog.py): JSONL lines every N steps from rank 0 only, and the PNG of its curves."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from models.training.runlog import LOG_FIELDS, RunLog, memory_stats, plot_curves, read_log


def fill(log: RunLog, steps: int) -> None:
    for step in range(1, steps + 1):
        log.log(step, loss=torch.tensor(4.0 / step), lr=1e-3 * step, tokens_per_s=1000.0 + step, grad_norm=0.5)


def test_lines_are_written_every_n_steps_with_the_fields(tmp_path):
    path = tmp_path / "run" / "log.jsonl"
    with RunLog(path, every=3) as log:
        fill(log, 10)
        assert log.log(11, loss=1.0, force=True, val_loss=1.5, note="end") is not None
        assert log.log(13, loss=1.0) is None, "not a multiple of every"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in lines] == [3, 6, 9, 11]
    for r in lines:
        assert set(LOG_FIELDS) <= set(r)
        assert isinstance(r["memory"], dict)
    assert lines[0]["loss"] == pytest.approx(4 / 3) and lines[0]["lr"] == pytest.approx(3e-3)
    assert lines[0]["tokens_per_s"] == 1003.0 and lines[0]["grad_norm"] == 0.5
    assert lines[-1]["val_loss"] == 1.5 and lines[-1]["note"] == "end" and lines[-1]["grad_norm"] is None
    if sys.platform != "win32":
        assert lines[0]["memory"]["process_peak_rss_mib"] > 10, "the process's peak resident memory, in MiB"
    assert "cuda_max_allocated_mib" not in memory_stats("cpu")


def test_each_line_is_flushed_as_it_is_written(tmp_path):
    log = RunLog(tmp_path / "log.jsonl", every=1)
    log.log(1, loss=2.0)
    assert json.loads((tmp_path / "log.jsonl").read_text())["loss"] == 2.0, "readable before close"
    log.log(2, loss=float("nan"), grad_norm=float("inf"))
    log.close()
    last = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])
    assert last["loss"] is None and last["grad_norm"] is None, "NaN and infinity are not JSON: null"


def test_only_the_enabled_rank_writes(tmp_path):
    path = tmp_path / "log.jsonl"
    with RunLog(path, every=1, enabled=False) as log:
        fill(log, 5)
        assert log.log(6, loss=1.0, force=True) is None
    assert not path.exists(), "a disabled log (a rank other than 0) creates no file"
    with pytest.raises(ValueError, match="every must be an int >= 1"):
        RunLog(path, every=0)


def test_a_resumed_run_appends_and_the_last_record_of_a_step_counts(tmp_path):
    path = tmp_path / "log.jsonl"
    with RunLog(path, every=2) as log:
        fill(log, 6)
    with RunLog(path, every=2) as log:  # resumed from the checkpoint of step 4
        log.log(6, loss=9.0)
        log.log(8, loss=8.0)
    records = read_log(path)
    assert [r["step"] for r in records] == [2, 4, 6, 8] and records[2]["loss"] == 9.0


def test_the_curves_are_plotted_to_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "log.jsonl"
    with RunLog(path, every=1) as log:
        fill(log, 20)
        log.log(20, loss=0.3, force=True, val_loss=0.4)
    png = plot_curves(path, tmp_path / "plots" / "curves.png", title="a run")
    assert png == tmp_path / "plots" / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert not [p for p in png.parent.iterdir() if p.name.endswith(".tmp")]
    (tmp_path / "empty.jsonl").write_text("")
    assert plot_curves(tmp_path / "empty.jsonl", tmp_path / "empty.png") is None
    assert "empty" in capsys.readouterr().out and not (tmp_path / "empty.png").exists()


def test_without_matplotlib_the_plot_is_skipped_with_a_note(tmp_path, monkeypatch, capsys):
    path = tmp_path / "log.jsonl"
    with RunLog(path) as log:
        fill(log, 3)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert plot_curves(path, tmp_path / "curves.png") is None
    assert "matplotlib is not installed" in capsys.readouterr().out and not (tmp_path / "curves.png").exists()
