"""The embedded corpus, the byte tokenizer, batches, the learning-rate schedule, and that training learns."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from models import TrainConfig, train
from models.training import data as corpus
from models.training.batches import prepare
from models.training.optim import lr_at
from models.training.parallel import World
from models.training.tokenizers import ByteTokenizer
from tests.models_helpers import one_thread, tiny_config  # noqa: F401  (one_thread is an autouse fixture)


def test_default_corpus_is_embedded_and_stable():
    text = corpus.default_corpus()
    assert 400_000 < len(text) < 600_000, "pydoc_data.topics: about 465 KB"
    assert text == corpus.default_corpus()
    assert b'The "if" statement' in text or b"if_stmt" in text


@given(st.text(max_size=50))
def test_encode_decode_round_trip(text):
    tokens = ByteTokenizer().encode(text)
    assert len(tokens) == len(text.encode("utf-8"))
    assert ByteTokenizer().decode(tokens) == text == ByteTokenizer().decode(torch.tensor(tokens))


@given(st.lists(st.integers(0, 300), max_size=30))
def test_streamed_decoding_equals_decoding_at_once(tokens):
    decoder = ByteTokenizer().stream()
    assert "".join(decoder(t) for t in tokens) + decoder.flush() == ByteTokenizer().decode(tokens)


def test_split_and_batches(tmp_path):
    data = bytes(range(32, 128)) * 50  # 4800 bytes of ASCII
    (tmp_path / "t.txt").write_bytes(data)
    cache = corpus.build_token_cache(tmp_path / "t.txt", ByteTokenizer(), tmp_path / "c.bin")
    train_part, val_part = cache.split(0.1, by="tokens")
    assert len(val_part) == 480 and len(train_part) == 4800 - 480
    assert bytes(val_part.tokens.tolist()) == data[-480:], "validation is the held-out end"
    gen = torch.Generator().manual_seed(0)
    x, y = train_part.random_windows(4, 16, gen)
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1]), "targets are the inputs shifted by one"
    again = train_part.random_windows(4, 16, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], x)
    batches = val_part.fixed_windows(3, 16, 2)
    assert len(batches) == 2 and batches[0][0].shape == (3, 16)
    assert batches[0][0][0, 0] == val_part.tokens[0] and batches[-1][1][-1, -1] == val_part.tokens[-1], "all of val"
    with pytest.raises(ValueError, match=r"too few for windows of seq_len=600"):
        val_part.fixed_windows(1, 600, 1)


def test_in_memory_text_is_trained_on_as_its_file_is(tmp_path):
    """One pipeline: bytes given to train go through a token cache like a file does, and give its batches."""
    data = ("ünïcode and lines\n" * 20 + "the end\n\n" + "more text\n" * 30).encode()
    (tmp_path / "t.txt").write_bytes(data)
    model = tiny_config(["retention"], vocab_size=256)
    for documents in ("none", "lines", "separator"):
        tc = TrainConfig(batch_size=4, seq_len=16, eval_batches=2, documents=documents)
        in_memory = prepare(model, tc, World(), data=data)
        from_file = prepare(model, dataclasses.replace(tc, data=tmp_path / "t.txt"), World())
        picked = in_memory.draw(torch.Generator().manual_seed(1))
        assert torch.equal(picked, from_file.draw(torch.Generator().manual_seed(1)))
        for a, b in zip(in_memory.make(picked), from_file.make(picked), strict=True):
            assert (a is None and b is None) or (torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b)
        for a, b in zip(in_memory.val_batches, from_file.val_batches, strict=True):
            assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
        in_memory.close()
        from_file.close()


def test_lr_schedule():
    tc = TrainConfig(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, tc) == pytest.approx(0.1) and lr_at(9, tc) == pytest.approx(1.0)
    assert lr_at(10, tc) == pytest.approx(1.0) and lr_at(99, tc) == pytest.approx(0.1, abs=1e-3)
    assert all(lr_at(s, tc) >= lr_at(s + 1, tc) for s in range(10, 99))
    assert lr_at(5, TrainConfig(steps=10, warmup_steps=0, lr=1.0)) < 1.0


def test_training_learns_a_pattern():
    """A repeated sentence is easy: a tiny hybrid must get far below the uniform loss log(256)."""
    text = b"the cat sat on the mat. " * 200
    config = tiny_config(["retention", "softmax_attention"], vocab_size=256, d_model=32)
    tc = TrainConfig(steps=60, batch_size=4, seq_len=24, eval_every=30, eval_batches=2, sample_tokens=24, lr=1e-2)
    result = train(config, tc, data=text, progress=False)
    assert [s for s, _ in result.val_curve] == [0, 30, 60]
    assert result.val_curve[0][1] > 0.9 * math.log(256)
    assert result.val_loss < 1.0, result.val_curve
    assert result.sample.startswith("The ") and result.tokens_per_s > 0
    assert not result.model.training
