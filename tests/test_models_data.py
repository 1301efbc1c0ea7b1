"""The embedded corpus, the byte tokenizer, batches, the learning-rate schedule, and that training learns."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from models import TrainConfig, train
from models import data as corpus
from models.train import lr_at
from tests.models_helpers import one_thread, tiny_config  # noqa: F401  (one_thread is an autouse fixture)


def test_default_corpus_is_embedded_and_stable():
    text = corpus.default_corpus()
    assert 400_000 < len(text) < 600_000, "pydoc_data.topics: about 465 KB"
    assert text == corpus.default_corpus() and corpus.load_corpus() == text
    assert b'The "if" statement' in text or b"if_stmt" in text


@given(st.text(max_size=50))
def test_encode_decode_round_trip(text):
    tokens = corpus.encode(text)
    assert tokens.dtype == torch.long and len(tokens) == len(text.encode("utf-8"))
    assert corpus.decode(tokens) == text


@given(st.lists(st.integers(0, 300), max_size=30))
def test_streamed_decoding_equals_decoding_at_once(tokens):
    decoder = corpus.StreamDecoder()
    assert "".join(decoder(t) for t in tokens) + decoder.flush() == corpus.decode(tokens)


def test_split_and_batches():
    data = bytes(range(256)) * 20  # 5120 bytes
    train_part, val_part = corpus.split(data, 0.1, 16)
    assert len(val_part) == 512 and len(train_part) == 5120 - 512
    assert bytes(val_part.tolist()) == data[-512:], "validation is the held-out end"
    gen = torch.Generator().manual_seed(0)
    x, y = corpus.random_batch(train_part, 4, 16, gen)
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1]), "targets are the inputs shifted by one"
    again = corpus.random_batch(train_part, 4, 16, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], x)
    batches = corpus.fixed_batches(val_part, 3, 16, 2)
    assert len(batches) == 2 and batches[0][0].shape == (3, 16)
    assert batches[0][0][0, 0] == val_part[0] and batches[-1][1][-1, -1] == val_part[-1], "spread over all of val"
    with pytest.raises(ValueError, match=r"too small for seq_len=600"):
        corpus.split(data, 0.1, 600)


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
