"""Packed training: documents read from a text (a separator, one per line, JSONL), packed into fixed-length rows
with ``cu_seqlens`` so that nothing crosses a document, and a packed batch's loss is the sum of the documents'
own losses."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from models import cli, load, read_header
from models.config import ConfigError, ModelConfig, TrainConfig
from models.lm import build_model
from models.training import data as corpus
from models.training.batches import cache_options
from models.training.loop import train
from models.training.tokenizers import ByteTokenizer
from models.training.validation import evaluate
from tests.models_helpers import (
    one_thread,  # noqa: F401  (autouse fixture)
    tiny_run_file,
)

# documents -----------------------------------------------------------------------------------------------


def documents(tmp_path, data: bytes, how: str, **options: str) -> list[bytes]:
    """The documents training reads from ``data`` with ``documents=how``: those of its token cache."""
    (tmp_path / "d.txt").write_bytes(data)
    tc = TrainConfig(documents=how, **options)
    cache = corpus.build_token_cache(tmp_path / "d.txt", ByteTokenizer(), tmp_path / "d.bin", **cache_options(tc))
    return [bytes(cache.document(i).tolist()) for i in range(cache.n_documents)]


def test_documents_split_on_a_separator_dropping_empty_ones(tmp_path):
    data = b"first doc\nline two\n\nsecond\n\n\n\nthird\n\n"
    assert documents(tmp_path, data, "separator") == [b"first doc\nline two", b"second", b"third"]
    assert documents(tmp_path, b"a||b||||c", "separator", separator="||") == [b"a", b"b", b"c"]
    with pytest.raises(ConfigError, match="separator must be a non-empty string"):
        documents(tmp_path, data, "separator", separator="")
    with pytest.raises(ConfigError, match="documents must be one of"):
        documents(tmp_path, data, "paragraphs")


def test_documents_one_per_line(tmp_path):
    assert documents(tmp_path, b"one\ntwo\r\n\nthree", "lines") == [b"one", b"two", b"three"]
    assert documents(tmp_path, b"", "lines") == []


def test_documents_from_jsonl(tmp_path):
    lines = [json.dumps({"text": "héllo", "id": 1}), "", "   ", json.dumps({"text": ""}), json.dumps({"text": "b"})]
    assert documents(tmp_path, "\n".join(lines).encode(), "jsonl") == ["héllo".encode(), b"b"]
    other = json.dumps({"body": "x"}).encode()
    assert documents(tmp_path, other, "jsonl", jsonl_field="body") == [b"x"]


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("{not json", "d.txt:3: not valid JSON"),
        ("[1, 2]", "d.txt:3: a list, not an object"),
        ('{"body": "x"}', "d.txt:3: no field 'text'"),
        ('{"text": 5}', "d.txt:3: field 'text' is a int, not a string"),
    ],
)
def test_a_bad_jsonl_line_is_named_with_what_was_expected(tmp_path, line, match):
    data = "\n".join([json.dumps({"text": "ok"}), "", line, json.dumps({"text": "after"})]).encode()
    with pytest.raises(ConfigError, match=match) as info:
        documents(tmp_path, data, "jsonl")
    assert "expected one JSON object per line with a string field 'text'" in str(info.value)


# packing -------------------------------------------------------------------------------------------------


def labelled(lengths: list[int]) -> list[torch.Tensor]:
    """Document d's token i is ``1000 * (d + 1) + i``: a token names its document and position (0 is padding)."""
    return [1000 * (d + 1) + torch.arange(n) for d, n in enumerate(lengths)]


def check_packing(lengths: list[int], seq_len: int) -> None:
    docs = labelled(lengths)
    rows = corpus.pack_documents(docs, seq_len)
    kept = {d: n for d, n in enumerate(lengths) if n >= 2}
    seen, counted = {}, 0
    for r in range(len(rows)):
        x, y, cu = rows[r]
        assert x.shape == y.shape == (seq_len,) and cu[0] == 0 and cu[-1] == seq_len
        assert (cu[1:] > cu[:-1]).all(), "no empty sequences in a row"
        assert int(rows.n_real[r]) == int((x != 0).sum())
        assert (y != corpus.IGNORE).sum() > 0, "a row without a counted target is left out"
        bounds = cu.tolist()
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            piece, targets = x[a:b], y[a:b]
            if (piece == 0).all():  # padding: its own sequence, at the row's end, no targets
                assert b == seq_len and (targets == corpus.IGNORE).all()
                continue
            doc, first = divmod(int(piece[0]), 1000)
            doc -= 1
            n = kept[doc]
            assert piece.tolist() == list(range(int(piece[0]), int(piece[0]) + (b - a))), "one document's run"
            assert first == 0 or a == 0, "a piece starts its document or a row (a cut document goes on there)"
            if first + (b - a) < n:  # the document goes on after this piece: the piece was cut at the row's end
                assert b == seq_len and n > seq_len - a, "only a document that does not fit is cut"
            for j, (token, target) in enumerate(zip(piece.tolist(), targets.tolist(), strict=True)):
                i = first + j
                assert (doc, i) not in seen, "every token is placed once"
                seen[doc, i] = True
                if i == n - 1:
                    assert target == corpus.IGNORE, "a document's last token predicts nothing"
                else:
                    assert target == token + 1, "a counted target is the same document's next token"
                    counted += 1
            if n <= seq_len:
                assert first == 0 and b - a == n, "a document that fits in a row is never cut"
    assert counted == sum(n - 1 for n in kept.values())
    assert {(d, i) for d, n in kept.items() for i in range(n - 1)} <= set(seen), "every prediction is made once"


def test_packing_places_documents_whole_pads_and_cuts():
    rows = corpus.pack_documents(labelled([5, 3, 11, 1, 4]), 8)
    as_lists = [[t.tolist() for t in rows[r]] for r in range(len(rows))]
    d = [1000 * k for k in range(1, 6)]
    no = corpus.IGNORE
    assert as_lists == [
        # documents 1 and 2 fill row 0
        [
            [*range(d[0], d[0] + 5), *range(d[1], d[1] + 3)],
            [*range(d[0] + 1, d[0] + 5), no, d[1] + 1, d[1] + 2, no],
            [0, 5, 8],
        ],
        # document 3 (11 tokens) does not fit in a row: cut; its last piece's target is its real next token
        [list(range(d[2], d[2] + 8)), list(range(d[2] + 1, d[2] + 9)), [0, 8]],
        # its rest starts row 2 as a new sequence; document 4 (1 token) predicts nothing and is left out;
        # document 5; then padding as a sequence of its own
        [
            [d[2] + 8, d[2] + 9, d[2] + 10, *range(d[4], d[4] + 4), 0],
            [d[2] + 9, d[2] + 10, no, *range(d[4] + 1, d[4] + 4), no, no],
            [0, 3, 7, 8],
        ],
    ]
    check_packing([5, 3, 11, 1, 4], 8)


def test_a_document_that_fits_a_row_but_not_the_room_starts_a_new_row():
    rows = corpus.pack_documents(labelled([6, 5]), 8)
    assert len(rows) == 2 and rows[0][2].tolist() == [0, 6, 8] and rows[0][0][6:].tolist() == [0, 0]
    assert rows[1][2].tolist() == [0, 5, 8]
    check_packing([6, 5], 8)


def test_rows_without_a_counted_target_are_left_out():
    rows = corpus.pack_documents(labelled([9]), 8)  # the 9th token alone (no target) and padding: no row
    assert len(rows) == 1 and (rows[0][1] != corpus.IGNORE).sum() == 8
    assert len(corpus.pack_documents([], 8)) == 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=12), st.integers(1, 16))
def test_packing_rule_holds_for_any_lengths(lengths, seq_len):
    check_packing(lengths, seq_len)


def test_batches_join_the_rows_boundaries():
    rows = corpus.pack_documents(labelled([5, 3, 11, 4, 2, 7]), 8)  # rows: 5+3, 8 of 11, 3+4+pad, 2+pad, 7+pad
    assert len(rows) == 5
    x, y, cu = rows.batch([2, 0])
    assert x.shape == y.shape == (1, 16)
    assert cu.tolist() == [0, 3, 7, 8, 13, 16]
    assert torch.equal(x[0, :8], rows[2][0]) and torch.equal(y[0, 8:], rows[0][1])


# the loss of a packed batch is the documents' own loss ---------------------------------------------------

HYBRID = [{"mixer": "retention"}, {"mixer": "softmax_attention"}]
CONV = [{"mixer": "retention", "conv_size": 4}, {"mixer": "retention", "conv_size": 4}]


def document_loss(model, doc: torch.Tensor, mode: str) -> torch.Tensor:
    """The reference: the summed next-token loss of ``doc`` run alone, as per-document training has it."""
    logits, _ = model(doc[None], mode=mode, chunk_size=4)
    return F.cross_entropy(logits[0, :-1], doc[1:], reduction="sum")


@pytest.mark.parametrize("layers", [HYBRID, CONV], ids=["retention+attention", "retention-conv"])
@pytest.mark.parametrize("mode", ["parallel", "chunkwise"])
def test_packed_loss_is_the_sum_of_the_documents_losses(layers, mode):
    torch.manual_seed(0)
    model = build_model(dict(vocab_size=256, d_model=32, n_layers=2, layers=layers)).double().eval()
    gen = torch.Generator().manual_seed(1)
    lengths = [7, 12, 3, 16, 2, 9, 5, 11, 14, 1, 6]  # all fit in a row of 16: none is cut
    docs = [torch.randint(0, 256, (n,), generator=gen) for n in lengths]
    rows = corpus.pack_documents(docs, 16)
    x, y, cu = rows.batch(list(range(len(rows))))
    assert len(cu) - 1 > len(rows), "several sequences per row"
    with torch.no_grad():
        logits, _ = model(x, mode=mode, chunk_size=4, cu_seqlens=cu)
        packed = F.cross_entropy(logits[0], y[0], ignore_index=corpus.IGNORE, reduction="sum")
        expected = sum(document_loss(model, doc, mode) for doc in docs if len(doc) >= 2)
    assert int((y != corpus.IGNORE).sum()) == sum(n - 1 for n in lengths)
    torch.testing.assert_close(packed, expected, rtol=1e-10, atol=1e-10)
    tc = TrainConfig(mode=mode, chunk_size=4)
    half = len(rows) // 2
    halves = [rows.batch(range(half)), rows.batch(range(half, len(rows)))]
    mean = evaluate(model, halves, tc)  # the sum over both batches over the count of counted targets
    assert math.isclose(mean, expected.item() / sum(n - 1 for n in lengths), rel_tol=1e-5)  # evaluate: float32


# training ------------------------------------------------------------------------------------------------

TINY_MODEL = ModelConfig(
    vocab_size=256, d_model=16, n_layers=1, layers=["retention"], mixer_options={"retention": {"num_heads": 2}}
)


def lines_text(n: int = 60) -> bytes:
    return "\n".join(f"line {k}: the quick brown fox {'jumps ' * (k % 4)}over the dog" for k in range(n)).encode()


def test_train_on_packed_lines(tmp_path):
    tc = TrainConfig(
        steps=3, batch_size=2, seq_len=32, eval_every=3, eval_batches=2, sample_tokens=0, documents="lines"
    )
    result = train(TINY_MODEL, tc, data=lines_text(), out=tmp_path, progress=False)
    assert len(result.train_curve) == 3 and all(math.isfinite(loss) for _, loss in result.train_curve)
    assert [step for step, _ in result.val_curve] == [0, 3] and math.isfinite(result.val_loss)
    assert result.tokens_per_s > 0
    model = load(tmp_path / "model.safetensors")
    info = read_header(tmp_path / "model.safetensors")[1]
    assert info["step"] == 3 and info["train"]["documents"] == "lines"
    assert math.isclose(info["val_loss"], result.val_loss)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in result.model.parameters())


def test_packed_training_needs_two_documents():
    tc = TrainConfig(steps=1, batch_size=1, seq_len=8, sample_tokens=0, documents="lines")
    with pytest.raises(ConfigError, match="at least one each"):
        train(TINY_MODEL, tc, data=b"only one line, and a blank one\n\n", progress=False)


def test_train_config_checks_the_document_fields():
    with pytest.raises(ConfigError, match="documents must be one of"):
        TrainConfig(documents="paragraphs")
    with pytest.raises(ConfigError, match="separator must be a non-empty string"):
        TrainConfig(separator="")
    with pytest.raises(ConfigError, match="jsonl_field must be a non-empty string"):
        TrainConfig(jsonl_field=3)
    assert TrainConfig().documents == "none"


def test_cli_trains_on_jsonl_documents(tmp_path, capsys):
    config = tiny_run_file(tmp_path / "tiny.toml", seq_len=24)
    data = tmp_path / "docs.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"document {k}: some words, {k * 'x'}"}) for k in range(30)))
    out = tmp_path / "run"
    argv = ["train", "--config", str(config), "--data", str(data), "--out", str(out), "--documents", "jsonl"]
    assert cli.main([*argv, "--quiet"]) == 0
    assert "(packed jsonl documents)" in capsys.readouterr().err
    assert read_header(out / "model.safetensors")[1]["train"]["documents"] == "jsonl"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"text": "b"}\n{"txt": "c"}\n')
    argv = ["train", "--config", str(config), "--data", str(bad), "--out", str(tmp_path / "x"), "--documents", "jsonl"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"seqmixers train: error: {bad}:3: no field 'text'" in err  # streamed: the file and line are named
