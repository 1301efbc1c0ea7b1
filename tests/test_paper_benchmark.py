"""The paper benchmark (``python -m benchmarks.paper``) end to end on a budget of a few steps: every part writes
its JSON (the schema checked), its Markdown table under the machine/threads/date header, and a valid PNG drawn
from the JSON alone."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from benchmarks.paper import plot
from benchmarks.paper.common import PARTS, QUICK, Budget
from benchmarks.paper.suite import main, run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY = dataclasses.replace(
    QUICK, name="smoke", seeds=(0, 1),
    lm_steps=2, lm_batch=2, lm_seq_len=16, lm_eval_batches=1,
    mqar_steps=2, mqar_batch=4, mqar_eval_size=8,
    cost_model=(16, 2, 2), train_lengths=(16, 32), cost_repeats=1,
    prefixes=(8, 16), batches=(1, 2), batch_prefix=8, decode_steps=1, decode_repeats=1, compile_batches=(),
)  # fmt: skip
STATS = {"mean": float, "std": float, "min": float, "max": float, "n": int, "values": list}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[Path]]]:
    out = tmp_path_factory.mktemp("paper")
    return out, run(out, TINY, workers=1, threads=1, progress=False)


def load(out: Path, part: str) -> dict:
    return json.loads((out / f"{part}.json").read_text())


def check_stats(s: dict, n: int) -> None:
    assert set(s) == set(STATS) and s["n"] == n == len(s["values"])
    assert all(isinstance(s[k], t) for k, t in STATS.items())
    assert s["min"] <= s["mean"] <= s["max"]


def test_every_part_writes_json_markdown_and_png(results):
    out, written = results
    assert set(written) == {*PARTS, "summary"}
    for part in PARTS:
        assert written[part] == [out / f"{part}.json", out / f"{part}.md", out / f"{part}.png"]
        png = (out / f"{part}.png").read_bytes()
        assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000, part
    summary = (out / "summary.md").read_text()
    assert all(f"## {load(out, part)['title']}" in summary for part in PARTS)


def test_every_table_has_the_machine_threads_and_date_header(results):
    out, _ = results
    for part in PARTS:
        result = load(out, part)
        machine = result["machine"]
        assert isinstance(machine["threads"], int) and machine["threads"] >= 1
        assert isinstance(machine["cpu_count"], int) and machine["processor"] and result["date"]
        assert result["part"] == part and result["budget"] == json.loads(json.dumps(dataclasses.asdict(TINY)))
        assert result["budget"]["seeds"] == [0, 1]
        header = result["header"]
        assert machine["processor"] in header and f"{machine['threads']} torch thread(s)" in header
        assert result["date"] in header and "smoke mode" in header
        md = (out / f"{part}.md").read_text()
        assert result["tables"], part
        for name, table in result["tables"].items():
            assert table.startswith("| ") and f"### {name}\n\n{header}\n\n{table}\n" in md, (part, name)
        for name, table in result["paper_tables"].items():
            assert f"### {name}\n\nFrom the paper" in md and table in md
        assert any("smoke mode" in note for note in result["notes"]), part
        assert all(f"- {note}" in md for note in result["notes"])


def test_ablation_rows(results):
    out, _ = results
    result = load(out, "ablations")
    rows = result["rows"]
    assert [r["variant"] for r in rows] == [
        "full", "no_gate", "no_group_norm", "no_decay", "no_multi_scale", "small_head_dim", "paper_schedule",
    ]  # fmt: skip
    for row in rows:
        assert row["corpus"] == "embedded corpus" and isinstance(row["params"], int)
        check_stats(row["val_ppl"], 2)
        assert set(result["runs"]["embedded corpus"][row["variant"]]) == {"0", "1"}
    by = {r["variant"]: r for r in rows}
    assert by["full"]["delta_vs_full"] == 0 and by["full"]["paper_ppl"] == 26.05
    assert by["no_gate"]["params"] < by["full"]["params"] and by["no_gate"]["paper_delta"] == pytest.approx(1.79)
    assert by["paper_schedule"]["options"] == {"decay_schedule": "paper"} and by["paper_schedule"]["paper_ppl"] is None


def test_comparison_rows_are_parameter_matched(results):
    out, _ = results
    rows = load(out, "comparison")["rows"]
    assert {r["model"] for r in rows} == {
        "retention", "gated_retention", "linear_attention", "softmax_attention", "hybrid", "short_conv",
    }  # fmt: skip
    reference = next(r for r in rows if r["model"] == "softmax_attention")
    for row in rows:
        for task in ("lm", "mqar"):
            assert abs(row[f"{task}_params"] - reference[f"{task}_params"]) <= 0.02 * reference[f"{task}_params"]
        check_stats(row["val_ppl"]["embedded corpus"], 2)
        check_stats(row["mqar_accuracy"], 2)
        assert 0 <= row["mqar_accuracy"]["min"] <= row["mqar_accuracy"]["max"] <= 1


def test_cost_rows(results):
    out, _ = results
    training = load(out, "training_cost")
    for model in ("retnet", "transformer"):
        rows = training["models"][model]["rows"]
        assert [r["T"] for r in rows] == [16, 32]
        assert all(r["tokens_per_s"] > 0 and r["peak_bytes"] > 0 for r in rows)
    assert set(training["crossing"]) == {"tokens_per_s", "peak_bytes"}
    inference = load(out, "inference_cost")
    for model in ("retnet", "transformer"):
        rows = inference["models"][model]["rows"]
        assert [(r["P"], r["B"]) for r in rows] == [(8, 1), (16, 1), (8, 2)]
        assert all(r["eager_ms"] > 0 and "compiled_ms" not in r for r in rows)  # compile_batches=() in TINY
    retnet, transformer = (inference["models"][m]["rows"] for m in ("retnet", "transformer"))
    assert retnet[0]["state_bytes"] == retnet[1]["state_bytes"]  # a fixed-size state
    assert transformer[1]["state_bytes"] == 2 * transformer[0]["state_bytes"]  # a KV cache grows with the prefix
    assert transformer[2]["state_bytes"] == 2 * transformer[0]["state_bytes"]  # ... and with the batch


def test_figures_redraw_from_the_json_alone(results, tmp_path):
    out, _ = results
    for part in PARTS:
        (tmp_path / f"{part}.json").write_text((out / f"{part}.json").read_text())
    assert plot.plot(tmp_path) == [tmp_path / f"{part}.png" for part in PARTS]
    assert all((tmp_path / f"{part}.png").read_bytes().startswith(PNG_SIGNATURE) for part in PARTS)


def test_bad_input_is_refused_with_what_was_given(tmp_path):
    with pytest.raises(ValueError, match=r"parts must be a non-empty selection of .*, got \['ablation'\]"):
        run(tmp_path, TINY, parts=["ablation"])
    with pytest.raises(FileNotFoundError, match="--text must be a text file, got '.*missing.txt'"):
        run(tmp_path, TINY, text=tmp_path / "missing.txt")
    with pytest.raises(ValueError, match=r"batch_prefix must be one of prefixes \(8, 16\), got 9"):
        dataclasses.replace(TINY, batch_prefix=9)
    with pytest.raises(ValueError, match="at least one seed"):
        Budget(**{**dataclasses.asdict(TINY), "seeds": ()})
    with pytest.raises(SystemExit):
        main(["--only", "nothing"])


def test_a_text_file_is_trained_on_beside_the_embedded_corpus(tmp_path):
    text = tmp_path / "tiny.txt"
    text.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(80)))
    run(tmp_path / "out", dataclasses.replace(TINY, seeds=(0,)), parts=["ablations"], text=text, progress=False)
    result = load(tmp_path / "out", "ablations")
    assert set(result["runs"]) == {"embedded corpus", str(text.resolve())}
    assert [r["corpus"] for r in result["rows"]] == ["embedded corpus"] * 7 + [str(text.resolve())] * 7
    assert list(result["tables"]) == [
        "Validation perplexity on the embedded corpus",
        "Validation perplexity on tiny.txt",
    ]
    full = [r["val_ppl"]["mean"] for r in result["rows"] if r["variant"] == "full"]
    assert full[0] != full[1] and all(r["val_ppl"]["std"] is None for r in result["rows"])  # one seed: no spread
    assert (tmp_path / "out" / "ablations.png").read_bytes().startswith(PNG_SIGNATURE)
