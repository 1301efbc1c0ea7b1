"""Training on data from disk: a file, a folder of them or JSONL, streamed into the memory-mapped token cache under
``OUT/cache/`` (built once, then reused), with the byte tokenizer or a BPE tokenizer trained on the data and saved
beside the checkpoint, which ``seqmixers generate`` then uses."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
import torch

from models import cli, load, read_header
from models.config import ConfigError, ModelConfig, TrainConfig
from models.training import data as memory
from models.training import loop as training
from models.training.data import build_token_cache, iter_texts
from models.training.folder import CACHE_DIR, CACHE_NAME
from models.training.tokenizers import TOKENIZER_FILE, BPETokenizer, ByteTokenizer, load_tokenizer
from tests.models_helpers import (
    one_thread,  # noqa: F401  (autouse fixture)
    tiny_run_file,
)

pytest.importorskip("tokenizers")

MODEL = ModelConfig(
    d_model=16, n_layers=1, layers=["retention"], ffn_dim=16, mixer_options={"retention": {"num_heads": 2}}
)
TC = TrainConfig(steps=2, batch_size=2, seq_len=16, eval_every=2, eval_batches=1, sample_tokens=0)


def on(path, tc=TC, **changes) -> TrainConfig:
    """``tc`` (with ``changes``) training on the file or folder ``path``."""
    return dataclasses.replace(tc, data=path, **changes)


def lines(i: int, n: int = 30) -> str:
    return "\n".join(f"line {k} of file {i}: the quick brown fox {'jumps ' * (k % 3)}over the dog" for k in range(n))


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "texts"
    (root / "sub").mkdir(parents=True)
    for i, name in enumerate(["a.txt", "b.md", "sub/c.txt"]):
        (root / name).write_text(lines(i))
    (root / "ignored.bin").write_bytes(b"\x00" * 100)
    return root


@pytest.fixture
def jsonl(tmp_path) -> Path:
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"document {k}: some words, {'x' * k}"}) for k in range(30)))
    return path


def sidecar(out: Path) -> Path:
    return out / CACHE_DIR / Path(CACHE_NAME).with_suffix(".json")


@pytest.mark.parametrize("documents", ["none", "lines"])
def test_train_from_a_folder_builds_then_reuses_its_cache(folder, tmp_path, documents):
    tc = dataclasses.replace(TC, documents=documents)
    out = tmp_path / "run"
    result = training.train(MODEL, on(folder, tc), out=out, progress=False)
    assert math.isfinite(result.val_loss) and len(result.train_curve) == 2
    meta = json.loads(sidecar(out).read_text())
    assert [Path(f["path"]).name for f in meta["files"]] == ["a.txt", "b.md", "c.txt"], "sorted, .bin left out"
    assert meta["length"] == sum(len(lines(i).encode()) for i in range(3)) - (3 * 29 if documents == "lines" else 0)
    assert isinstance(result.tokenizer, ByteTokenizer) and not (out / TOKENIZER_FILE).exists()
    stamp = sidecar(out).stat().st_mtime_ns, (out / "cache" / "tokens.bin").stat().st_mtime_ns
    again = training.train(MODEL, on(folder, tc), out=out, progress=False)
    assert (sidecar(out).stat().st_mtime_ns, (out / "cache" / "tokens.bin").stat().st_mtime_ns) == stamp, "reused"
    assert again.val_curve == result.val_curve, "the same data, the same run"


def test_train_from_jsonl_packs_its_records_and_reuses_the_cache(jsonl, tmp_path, capsys):
    tc = dataclasses.replace(TC, documents="jsonl")
    out = tmp_path / "run"
    result = training.train(MODEL, on(jsonl, tc), out=out, progress=True)
    assert math.isfinite(result.val_loss)
    meta = json.loads(sidecar(out).read_text())
    assert meta["n_documents"] == 30 and meta["files"][0]["format"] == "jsonl"
    assert "token cache built" in capsys.readouterr().err
    training.train(MODEL, on(jsonl, tc), out=out, progress=True)
    assert "token cache reused" in capsys.readouterr().err


def test_cache_packed_rows_are_the_packed_documents_for_lines(tmp_path):
    data = "\n".join(f"doc {k} {'ab' * (k % 7)}" for k in range(40)).encode()  # every line fits in a row
    path = tmp_path / "lines.txt"
    path.write_bytes(data)
    seq_len = 24
    cache = build_token_cache(path, ByteTokenizer(), tmp_path / "c" / "t.bin", documents="lines")
    docs = [torch.tensor(list(line)) for line in data.split(b"\n")]
    assert torch.equal(cache.tokens.long(), torch.cat(docs))
    rows = memory.pack_documents(docs, seq_len)
    # the document each in-memory row starts with (pack_documents's rule for documents that fit in a row)
    first, pos, offset = [], 0, 0
    for doc in docs:
        n = doc.numel()
        if n > seq_len - pos % seq_len:
            pos += seq_len - pos % seq_len
        if pos % seq_len == 0:
            first.append(offset)
        pos, offset = pos + n, offset + n
    assert len(first) == len(rows)
    for r, start in enumerate(first):
        for a, b in zip(rows.batch([r]), cache.packed_at([start], seq_len), strict=True):
            assert torch.equal(a, b), r
    picked = torch.tensor([first[3], first[0], first[5]])
    for a, b in zip(rows.batch([3, 0, 5]), cache.packed_at(picked, seq_len), strict=True):
        assert torch.equal(a, b)


def test_bpe_run_saves_its_tokenizer_and_generate_uses_it(folder, tmp_path, capsys):
    config = tiny_run_file(tmp_path / "tiny.toml")  # no vocab_size: the tokenizer's is taken
    out = tmp_path / "run"
    argv = ["train", "--config", str(config), "--data", str(folder), "--out", str(out), "--quiet"]
    assert cli.main([*argv, "--tokenizer", "bpe", "--bpe-vocab", "300"]) == 0
    err = capsys.readouterr().err
    assert f"data: {folder} (3 files), " in err and "BPE tokenizer of up to 300 ids" in err
    tok = load_tokenizer(out)
    assert isinstance(tok, BPETokenizer) and 256 < tok.vocab_size <= 300
    model_config, info = read_header(out / "model.safetensors")
    assert model_config.vocab_size == tok.vocab_size, "the model's vocabulary is the tokenizer's"
    assert info["train"]["tokenizer"] == "bpe" and info["train"]["bpe_vocab"] == 300
    assert len(tok.encode("the quick brown fox")) < len("the quick brown fox"), "merges learnt from the data"

    ckpt = str(out / "model.safetensors")
    prompt = "the quick brown fox"
    assert cli.main(["generate", ckpt, "--prompt", prompt, "--max-new-tokens", "12", "--seed", "3"]) == 0
    text = capsys.readouterr().out
    model = load(ckpt)
    ids = torch.tensor(tok.encode(prompt))
    expected = model.generate(ids, 12, temperature=0.8, seed=3)
    assert text.startswith(prompt) and text == prompt + tok.decode(expected[len(ids) :]) + "\n"
    assert cli.main(["generate", ckpt, "--prompt", prompt, "--prompt", "over", "--max-new-tokens", "5"]) == 0
    assert "==> prompt 2 <==\nover" in capsys.readouterr().out

    (out / TOKENIZER_FILE).rename(tmp_path / "elsewhere.json")
    assert cli.main(["generate", ckpt, "--prompt", prompt]) == 2
    assert re.search(r"trained with the bpe tokenizer, but .*tokenizer\.json is missing", capsys.readouterr().err)


def test_a_resumed_bpe_run_reuses_its_tokenizer_and_cache(folder, tmp_path):
    tc = dataclasses.replace(TC, tokenizer="bpe", bpe_vocab=300, save_every=1)
    big = MODEL  # the byte default: the tokenizer's size, in the first run and the resumed one
    out = tmp_path / "run"
    first = training.train(big, on(folder, tc), out=out, progress=False)
    assert first.model.config.vocab_size == first.tokenizer.vocab_size <= 300
    saved = (out / TOKENIZER_FILE).read_bytes()
    stamp = (out / TOKENIZER_FILE).stat().st_mtime_ns, sidecar(out).stat().st_mtime_ns
    resumed = training.train(big, on(folder, tc, steps=3), out=out, progress=False, resume=out)
    assert [s for s, _ in resumed.train_curve] == [1, 2, 3]
    assert (out / TOKENIZER_FILE).read_bytes() == saved
    assert ((out / TOKENIZER_FILE).stat().st_mtime_ns, sidecar(out).stat().st_mtime_ns) == stamp
    assert resumed.tokenizer == first.tokenizer


def test_bpe_with_in_memory_data_and_a_sample(tmp_path):
    tc = dataclasses.replace(TC, tokenizer="bpe", bpe_vocab=280, sample_tokens=6, sample_prompt="line ")
    result = training.train(dataclasses.replace(MODEL, vocab_size=280), tc, data=lines(0).encode(), progress=False)
    assert isinstance(result.tokenizer, BPETokenizer) and result.model.config.vocab_size == result.tokenizer.vocab_size
    assert result.sample.startswith("line ")


def test_errors_are_clear(folder, tmp_path, capsys):
    with pytest.raises(ConfigError, match="not both"):
        training.train(MODEL, on(folder), data=b"x" * 1000, progress=False)
    with pytest.raises(FileNotFoundError, match="neither a file nor a folder"):
        training.train(MODEL, on(tmp_path / "missing"), progress=False)
    out = tmp_path / "small"
    tc = dataclasses.replace(TC, tokenizer="bpe", bpe_vocab=300)
    with pytest.raises(ConfigError) as caught:  # a vocab_size chosen, and smaller than the tokenizer's
        training.train(dataclasses.replace(MODEL, vocab_size=257), on(folder, tc), out=out, progress=False)
    size = load_tokenizer(out).vocab_size
    assert f"vocab_size=257 in the model config is smaller than the BPE tokenizer's {size} ids" in str(caught.value)
    with pytest.raises(ConfigError, match=r"data '.*tiny\.txt' holds \d+ tokens; seq_len=16"):
        (tmp_path / "tiny.txt").write_text("a few words only")
        training.train(MODEL, on(tmp_path / "tiny.txt", tokenizer="bpe"), progress=False)
    with pytest.raises(ConfigError, match="tokenizer must be one of"):
        TrainConfig(tokenizer="wordpiece")
    with pytest.raises(ConfigError, match="bpe_vocab must be an int >= 256"):
        TrainConfig(bpe_vocab=100)

    config = tiny_run_file(tmp_path / "tiny.toml", model={"vocab_size": 1000})
    code = cli.main(["train", "--config", str(config), "--data", str(tmp_path / "nope"), "--out", str(out)])
    assert code == 2 and "neither a file nor a folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    code = cli.main(["train", "--config", str(config), "--data", str(tmp_path / "empty"), "--out", str(out)])
    assert code == 2 and "holds no files ending in" in capsys.readouterr().err


def test_text_stream_decodes_split_characters_once_complete(folder):
    for tok in (ByteTokenizer(), BPETokenizer.train(iter_texts(folder), 300, show_progress=False)):
        stream = tok.stream()
        ids = tok.encode("aé✓ and é")
        pieces = [stream(t) for t in ids] + [stream.flush()]
        assert "".join(pieces) == "aé✓ and é" and "\ufffd" not in "".join(pieces), tok
    stream = ByteTokenizer().stream()
    assert [stream(t) for t in "aé".encode()] == ["a", "", "é"]
    assert stream(0xE2) == "" and stream.flush() == "\ufffd"


def test_two_ranks_share_the_cache_and_tokenizer_rank_0_builds(folder, tmp_path):
    """DDP over 2 processes from a folder with BPE: rank 0 trains the tokenizer and builds the cache while rank 1
    waits, then opens them; the run equals one process's on the same data (to float32 rounding)."""
    from tests.dist_helpers import train_on_ranks

    tc = dataclasses.replace(TC, tokenizer="bpe", bpe_vocab=300, documents="lines", steps=3, eval_every=3)
    big = dataclasses.replace(MODEL, vocab_size=300)
    alone = training.train(big, on(folder, tc), out=tmp_path / "alone", progress=False)
    got = train_on_ranks(tmp_path, big, on(folder, tc), None, "ddp", out=tmp_path / "ranks")
    assert (tmp_path / "ranks" / TOKENIZER_FILE).read_bytes() == (tmp_path / "alone" / TOKENIZER_FILE).read_bytes()
    assert [s for s, _ in got["val_curve"]] == [s for s, _ in alone.val_curve]
    torch.testing.assert_close([v for _, v in got["val_curve"]], [v for _, v in alone.val_curve], rtol=2e-4, atol=0)
    torch.testing.assert_close([v for _, v in got["train_curve"]], [v for _, v in alone.train_curve], rtol=2e-4, atol=0)
