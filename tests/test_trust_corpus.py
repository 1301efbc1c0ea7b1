"""Trust in the data pipeline (issue 21): a token cache is checked before it is reused or opened, so that a
damaged or forged one is never trained on (items 4 and 13), and training a BPE tokenizer takes time in
proportion to its text, shows progress and stops at once on SIGINT or SIGTERM (item 10)."""

from __future__ import annotations

import dataclasses
import json
import os
import pty
import random
import re
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch

from models.config import ConfigError, ModelConfig, TrainConfig
from models.training import data as corpus
from models.training import folder, tokenizers
from models.training import loop as training
from models.training.data import TokenCacheError, default_corpus
from tests.models_helpers import (
    one_thread,  # noqa: F401  (autouse fixture)
    tiny_run_file,
)

MODEL = ModelConfig(
    d_model=16, n_layers=1, layers=["retention"], ffn_dim=16, mixer_options={"retention": {"num_heads": 2}}
)
TC = TrainConfig(steps=2, batch_size=2, seq_len=16, eval_every=2, eval_batches=1, sample_tokens=0)
LINES = "".join(f"line {k}: the quick brown fox {'jumps ' * (k % 3)}over the lazy dog\n" for k in range(60))


def flip(path: Path, *offsets: int) -> None:
    """Flip the bits of the bytes at ``offsets``, keeping the file's size and times (as the issue did)."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    for at in offsets:
        data[at] ^= 0xFF
    path.write_bytes(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def edit_sidecar(path: Path, change) -> None:
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


class Wide:
    """A tokenizer of ``vocab_size`` ids: each character's code point modulo it, and its largest id after each
    piece (so the cache holds the top id of any dtype)."""

    name = "wide"

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size, self.fingerprint = vocab_size, f"wide-{vocab_size}"

    def encode(self, text: str) -> list[int]:
        return [ord(c) % self.vocab_size for c in text] + [self.vocab_size - 1]

    def decode(self, ids) -> str:
        return ""

    def save(self, directory) -> None:
        pass


# Item 4: a damaged cache is never reused ------------------------------------------------------------------

TOP = max(LINES.encode())  # the largest byte of LINES
DAMAGES = {  # how a cache c.bin (with c.starts.bin, c.json) is damaged, and what the error says
    "a byte of the tokens flipped": (lambda t, s, m: flip(t, 100), "c.bin does not match its checksum"),
    "a byte of the starts flipped": (lambda t, s, m: flip(s, 8 * 3), "c.starts.bin does not match its checksum"),
    "the tokens cut short": (lambda t, s, m: t.write_bytes(t.read_bytes()[:-5]), "c.bin holds 3[0-9]+ bytes"),
    "the tokens missing": (lambda t, s, m: t.unlink(), "c.bin is missing"),
    "another checksum recorded": (
        lambda t, s, m: edit_sidecar(m, lambda meta: meta["crc32"].update(tokens=12345)),
        "c.bin does not match its checksum",
    ),
    "a smaller largest id recorded": (
        lambda t, s, m: edit_sidecar(m, lambda meta: meta.update(max_id=60)),
        f"largest token id is {TOP}, where c.json records 60",
    ),
    "the sidecar not JSON": (lambda t, s, m: flip(m, 0), "sidecar .*c.json is damaged: not valid JSON"),
    "a field of the wrong type": (
        lambda t, s, m: edit_sidecar(m, lambda meta: meta.update(crc32="none")),
        "sidecar c.json has no valid crc32",
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_cache_is_refused_when_opened_and_rebuilt_from_its_sources(tmp_path, damage):
    source = tmp_path / "t.txt"
    source.write_text(LINES)
    tokens, starts, meta = corpus.cache_paths(tmp_path / "c.bin")
    first = corpus.build_token_cache(source, tokenizers.ByteTokenizer(), tokens, documents="lines")
    good_tokens, good_starts = first.tokens.clone(), first.doc_starts.clone()
    assert first.n_documents == 60
    del first
    how, message = DAMAGES[damage]
    how(tokens, starts, meta)

    with pytest.raises(TokenCacheError, match=message) as error:  # what cannot rebuild: an error
        corpus.open_token_cache(tokens)
    assert isinstance(error.value, ConfigError) and str(tmp_path) in str(error.value)

    again = corpus.build_token_cache(source, tokenizers.ByteTokenizer(), tokens, documents="lines")
    assert again.built, "a damaged cache is built again from its sources, never reused"
    assert again.damaged is not None and re.search(message, again.damaged), "and says why"
    assert torch.equal(again.tokens, good_tokens) and torch.equal(again.doc_starts, good_starts)
    reused = corpus.build_token_cache(source, tokenizers.ByteTokenizer(), tokens, documents="lines")
    assert not reused.built and reused.damaged is None, "the rebuilt cache is reused"
    assert reused.meta["max_id"] == TOP and reused.meta["crc32"]["tokens"] == zlib.crc32(tokens.read_bytes())
    assert torch.equal(corpus.open_token_cache(tokens).tokens, good_tokens)


def forge(tokens: Path, meta: Path, ids: list[int]) -> None:
    """Overwrite the cache's tokens with ``ids`` (its dtype, same length) and record their true checksum and
    largest id: a cache that is consistent with its sidecar, but holds ids its tokenizer does not have."""
    info = json.loads(meta.read_text())
    dtype = corpus._DTYPES[info["dtype"]]
    data = torch.tensor(ids, dtype=torch.int64).to(dtype).view(torch.uint8).numpy().tobytes()
    assert len(data) == tokens.stat().st_size
    tokens.write_bytes(data)
    info.setdefault("crc32", {})["tokens"], info["max_id"] = zlib.crc32(data), max(ids)
    meta.write_text(json.dumps(info))


@pytest.mark.parametrize("case", ["flipped", "forged"])
def test_a_run_never_trains_on_a_damaged_or_forged_cache(tmp_path, capsys, case):
    source = tmp_path / "t.txt"
    source.write_text(LINES)
    out = tmp_path / "run"
    tc = TC if case == "flipped" else dataclasses.replace(TC, tokenizer="bpe", bpe_vocab=300)
    first = training.train(MODEL, dataclasses.replace(tc, data=source), out=out, progress=True)
    assert "token cache built" in capsys.readouterr().err
    tokens, _, meta = corpus.cache_paths(out / folder.CACHE_DIR / folder.CACHE_NAME)
    if case == "flipped":  # the case: bytes flipped, the size and modification time kept
        flip(tokens, *range(0, tokens.stat().st_size, 97))
    else:  # ids beyond the BPE tokenizer's (a cache of another tokenizer, or crafted), with a true checksum
        forge(tokens, meta, [1999 - i % 7 for i in range(json.loads(meta.read_text())["length"])])
    again = training.train(MODEL, dataclasses.replace(tc, data=source), out=out, progress=True)
    err = capsys.readouterr().err
    assert "token cache reused" not in err
    why = "does not match its checksum" if case == "flipped" else "holds token id 1999, beyond the tokenizer's"
    assert "token cache rebuilt (" in err and why in err, err
    assert again.val_curve == first.val_curve and again.train_curve == first.train_curve, "trained on the true data"


# Item 13: ids beyond the tokenizer -------------------------------------------------------------------------


@pytest.mark.parametrize("vocab", [2000, 1 << 16, 1 << 32])
def test_a_cache_with_ids_beyond_its_tokenizer_is_a_clear_error(tmp_path, vocab):
    source = tmp_path / "t.txt"
    source.write_text("some text\n" * 20)
    tokens, _, meta = corpus.cache_paths(tmp_path / "c.bin")
    built = corpus.build_token_cache(source, Wide(vocab), tokens)
    assert len(corpus.open_token_cache(tokens, tokenizer=Wide(vocab))) == len(built)
    assert built.meta["max_id"] == vocab - 1, "the largest id is measured right for every dtype"
    with pytest.raises(TokenCacheError, match=r"built with another tokenizer \('wide', fingerprint 'wide-"):
        corpus.open_token_cache(tokens, tokenizer=Wide(500))  # a cache of 2000 ids used with 500

    smaller = Wide(vocab - 1)  # a sidecar rewritten to claim a tokenizer whose ids stop below those in the cache
    edit_sidecar(meta, lambda m: m["tokenizer"].update(fingerprint=smaller.fingerprint, vocab_size=smaller.vocab_size))
    beyond = f"holds token id {vocab - 1}, beyond the tokenizer's {vocab - 1} ids \\(0 to {vocab - 2}\\)"
    with pytest.raises(TokenCacheError, match=beyond):
        corpus.open_token_cache(tokens, tokenizer=smaller)
    with pytest.raises(TokenCacheError, match=beyond):
        corpus.open_token_cache(tokens)  # against the vocabulary its sidecar records
    edit_sidecar(meta, lambda m: m.update(max_id=vocab - 2))  # and one that lies about its largest id too
    with pytest.raises(TokenCacheError, match=f"largest token id is {vocab - 1}, where c.json records {vocab - 2}"):
        corpus.open_token_cache(tokens, tokenizer=smaller)
    rebuilt = corpus.build_token_cache(source, smaller, tokens)
    assert rebuilt.built and "largest token id" in rebuilt.damaged and rebuilt.meta["max_id"] == vocab - 2


# Item 10: BPE training in bounded time, with progress, stopped at once by a signal ------------------------


def test_long_texts_are_fed_to_bpe_in_pieces_cut_before_whitespace():
    text = "word " * 100 + "x" * 150 + "\nlast line\tend"
    pieces = list(tokenizers.bounded_pieces([text, "", "short"], 64))
    assert "".join(pieces[:-1]) == text and pieces[-1] == "short" and all(0 < len(p) <= 64 for p in pieces)
    words = [p for p in pieces if "word" in p]
    assert all(p.startswith(" ") for p in words[1:]) and all(p.endswith("word") for p in words[:-1])
    assert "x" * 64 in pieces, "a run without whitespace is cut after max_chars"
    assert list(tokenizers.bounded_pieces(["a b"], 64)) == ["a b"]
    with pytest.raises(ValueError, match="max_chars must be an int >= 1"):
        list(tokenizers.bounded_pieces(["a"], 0))


def letters(n: int) -> str:
    """``n`` characters of English without a space or line end: one "word" to BPE's pre-tokenizer."""
    text = "".join(c for c in default_corpus().decode() if c.isalpha())
    return (text * (n // len(text) + 1))[:n]


def test_bpe_on_one_long_line_trains_in_seconds(tmp_path):
    line = tmp_path / "line.txt"
    line.write_text(letters(2_000_000))  # one 2 MB line: it took over 5 minutes
    code = (
        "import sys, time; from models.training.data import iter_texts; "
        "from models.training.tokenizers import BPETokenizer; t = time.perf_counter(); "
        "tok = BPETokenizer.train(iter_texts(sys.argv[1]), 1000); "
        "print(tok.vocab_size, tok.decode(tok.encode('Theparser')), time.perf_counter() - t)"
    )
    done = subprocess.run([sys.executable, "-c", code, str(line)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    size, decoded, seconds = done.stdout.split()
    assert (int(size), decoded) == (1000, "Theparser") and float(seconds) < 60


def test_bpe_training_shows_progress_on_a_terminal():
    pytest.importorskip("tokenizers")
    terminal, child_end = pty.openpty()
    code = "from models.training.tokenizers import BPETokenizer as T; T.train(['the cat sat on the mat '] * 300, 300)"
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=child_end, stdout=subprocess.DEVNULL)
    os.close(child_end)
    shown = b""
    while True:
        try:
            chunk = os.read(terminal, 4096)
        except OSError:  # the other end closed
            break
        if not chunk:
            break
        shown += chunk
    os.close(terminal)
    assert proc.wait(timeout=60) == 0
    assert b"Compute merges" in shown, shown[-500:]


def _children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.skipif(
    not Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists(),
    reason="finds the worker process through /proc/PID/task/PID/children (Linux)",
)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_bpe_training_at_once(tmp_path, signum):
    pytest.importorskip("tokenizers")
    data = tmp_path / "random.txt"  # random letters: BPE's merges alone take about a minute
    data.write_bytes(random.Random(0).randbytes(6_000_000).translate(bytes(97 + i % 26 for i in range(256))))
    config = tiny_run_file(tmp_path / "run.toml")
    argv = ["train", "--config", str(config), "--data", str(data), "--tokenizer", "bpe", "--bpe-vocab", "2000"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "models", *argv, "--out", str(tmp_path / "run"), "--quiet"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline, workers = time.monotonic() + 60, []
        while not workers and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
            workers = _children(proc.pid)
        time.sleep(1.0)  # well into the training
        assert proc.poll() is None, proc.communicate()
        sent = time.monotonic()
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=15)
        stopped = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    name = signal.Signals(signum).name
    assert proc.returncode == 128 + signum, err
    assert err.rstrip().endswith(f"seqmixers train: interrupted by {name} while training the BPE tokenizer"), err
    assert stopped < 5, f"stopped {stopped:.1f} s after {signal.Signals(signum).name}"
    assert workers and not any(Path(f"/proc/{w}").exists() for w in workers), "the worker process is gone"
