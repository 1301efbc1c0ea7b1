"""Training data on disk (models/corpus.py): files, folders and JSONL streamed; the byte and BPE tokenizers; the
memory-mapped token cache and the windows and packed rows drawn from it."""

from __future__ import annotations

import json
import os
import re
import sys
import tracemalloc
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from models.training import data as corpus
from models.training import tokenizers
from models.training.data import IGNORE, DocumentError, pack_documents

TEXT = "The first line.\nA second, longer line with ünïcödé.\r\n\nAfter a blank line\rand an old Mac ending.\n"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8"))
    return path


def jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    return write(path, "".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)))


def folder(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    write(root / "b" / "z.txt", "zed file\n")
    write(root / "a.md", "# a markdown file\n")
    write(root / "b" / "c" / "deep.rst", "deep\n")
    jsonl(root / "b" / "docs.jsonl", ["json one", "", "json two"])
    write(root / "notes.py", "print('not data')\n")  # not a data suffix
    write(root / ".hidden" / "x.txt", "hidden\n")
    write(root / ".dot.txt", "hidden too\n")
    return root


# Reading -----------------------------------------------------------------------------------------------


def test_a_text_file_is_read_in_blocks_that_join_to_it(tmp_path):
    path = write(tmp_path / "t.txt", TEXT * 50)
    assert "".join(corpus.iter_texts(path)) == TEXT * 50
    pieces = list(corpus.iter_pieces(path, block_chars=64))
    assert len(pieces) > 10 and max(len(p) for p, _ in pieces) <= 2 * 64, "read a block at a time, not whole"
    assert [first for _, first in pieces] == [True] + [False] * (len(pieces) - 1), "one file, one document"
    assert all(p.endswith(("\n", "\r")) for p, _ in pieces[:-1]), "pieces end at line ends where possible"
    assert "".join(p for p, _ in pieces) == TEXT * 50


def test_lines_mode_gives_one_document_per_non_empty_line(tmp_path):
    path = write(tmp_path / "t.txt", TEXT + "x" * 25 + "\n")
    docs = []
    for text, first in corpus.iter_pieces(path, documents="lines", block_chars=10):
        docs.append(text) if first else docs.__setitem__(-1, docs[-1] + text)
    assert docs == [
        "The first line.",
        "A second, longer line with ünïcödé.",
        "After a blank line",
        "and an old Mac ending.",
        "x" * 25,
    ]


@pytest.mark.parametrize("how", ["lines", "separator"])
def test_streamed_documents_do_not_depend_on_the_block_size(tmp_path, how):
    text = "one\n\ntwo\nlines\n\n\n\nthree\r\n\r\nfour\rfive\n\n" + "long " * 40 + "\n\nend"
    path = write(tmp_path / "t.txt", text)
    pieces = re.split(r"\r\n|\r|\n", text) if how == "lines" else text.split("\n\n")
    want = [piece for piece in pieces if piece]
    for block_chars in (1, 2, 3, 7, 64, 10_000):
        assert documents_of(path, documents=how, block_chars=block_chars) == want, block_chars
    crlf = documents_of(path, documents="separator", separator="\r\n", block_chars=3)
    assert crlf == [d for d in text.split("\r\n") if d]
    with pytest.raises(ValueError, match="separator must be a non-empty string"):
        list(corpus.iter_pieces(path, documents="separator", separator=""))


def test_a_folder_is_read_recursively_in_sorted_order_with_its_data_suffixes(tmp_path):
    root = folder(tmp_path)
    files = [(p.relative_to(root).as_posix(), kind) for p, kind in corpus.source_files(root)]
    assert files == [("a.md", "text"), ("b/c/deep.rst", "text"), ("b/docs.jsonl", "jsonl"), ("b/z.txt", "text")]
    assert list(corpus.iter_texts(root)) == ["# a markdown file\n", "deep\n", "json one", "json two", "zed file\n"]
    assert [p.name for p, _ in corpus.source_files(root, fmt="jsonl")] == ["docs.jsonl"]
    assert [p.name for p, _ in corpus.source_files(root, fmt="text")] == ["a.md", "deep.rst", "z.txt"]
    with pytest.raises(FileNotFoundError, match="neither a file nor a folder"):
        corpus.source_files(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"holds no files ending in \.txt"):
        corpus.source_files(tmp_path / "empty")


def test_jsonl_reads_the_field_and_names_the_file_and_line_of_a_bad_line(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", ["one", "two"], field="body")
    assert list(corpus.iter_texts(path, field="body")) == ["one", "two"]
    with pytest.raises(DocumentError, match=r"d\.jsonl:1: no field 'text'"):
        list(corpus.iter_texts(path))
    write(path, '{"text": "fine"}\n\n{"text": "also fine"}\n{"text": broken\n')
    with pytest.raises(DocumentError, match=r"d\.jsonl:4: not valid JSON") as info:
        list(corpus.iter_texts(path))
    assert str(path) in str(info.value)
    write(path, '{"text": 5}\n')
    with pytest.raises(DocumentError, match=r"d\.jsonl:1: field 'text' is a int, not a string"):
        list(corpus.iter_texts(path))
    write(tmp_path / "d.txt", '{"text": "read as JSONL"}\n')
    assert list(corpus.iter_texts(tmp_path / "d.txt", fmt="jsonl")) == ["read as JSONL"]


# Tokenizers --------------------------------------------------------------------------------------------


@given(st.text(max_size=60))
def test_byte_tokenizer_round_trip(text):
    tok = tokenizers.ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and tok.decode(ids) == text and tok.decode(torch.tensor(ids)) == text
    assert tok.vocab_size == 256 and isinstance(tok, tokenizers.Tokenizer)


def test_bpe_trains_saves_and_loads_and_round_trips(tmp_path):
    pytest.importorskip("tokenizers")
    path = write(tmp_path / "t.txt", ("the cat sat on the mat. the dog sat on the log.\n" * 40) + TEXT)
    tok = tokenizers.BPETokenizer.train(corpus.iter_texts(path), vocab_size=300)
    assert isinstance(tok, tokenizers.Tokenizer) and 256 < tok.vocab_size <= 300
    sample = "the cat sat on the log, ünïcödé 😀 and bytes it never saw: \x00\t~"
    ids = tok.encode(sample)
    assert tok.decode(ids) == sample, "byte-level BPE encodes and decodes every text exactly"
    assert len(tok.encode("the cat sat on the mat.")) < len(b"the cat sat on the mat.") / 2
    out = tmp_path / "run"
    assert tokenizers.load_tokenizer(out) == tokenizers.ByteTokenizer(), "no tokenizer.json: bytes"
    assert tokenizers.load_tokenizer(None) == tokenizers.ByteTokenizer()
    tok.save(out)
    assert (out / "tokenizer.json").is_file()
    loaded = tokenizers.load_tokenizer(out)
    assert isinstance(loaded, tokenizers.BPETokenizer) and loaded == tok and loaded.fingerprint == tok.fingerprint
    assert loaded.encode(sample) == ids and loaded.vocab_size == tok.vocab_size
    tokenizers.ByteTokenizer().save(out)
    assert tokenizers.load_tokenizer(out) == tokenizers.ByteTokenizer(), "saving bytes replaces the BPE tokenizer"
    with pytest.raises(ValueError, match="vocab_size must be an int >= 256"):
        tokenizers.BPETokenizer.train(["x"], vocab_size=100)


def test_bpe_without_the_tokenizers_library_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ImportError, match="pip install tokenizers"):
        tokenizers.BPETokenizer.train(["some text"], vocab_size=300)


# The token cache ---------------------------------------------------------------------------------------


def documents_of(source: Path, **options) -> list[str]:
    docs: list[str] = []
    for text, first in corpus.iter_pieces(source, **options):
        docs.append(text) if first else docs.__setitem__(-1, docs[-1] + text)
    return docs


def test_the_cache_holds_the_tokens_and_document_starts(tmp_path):
    root = folder(tmp_path)
    cache = corpus.build_token_cache(root, tokenizers.ByteTokenizer(), tmp_path / "cache" / "train.bin")
    docs = documents_of(root)
    encoded = [d.encode("utf-8") for d in docs]
    assert cache.built and cache.tokens.dtype == torch.uint8 and cache.vocab_size == 256
    assert bytes(cache.tokens.tolist()) == b"".join(encoded)
    assert cache.doc_starts.tolist() == [sum(map(len, encoded[:i])) for i in range(len(docs))]
    assert [bytes(cache.document(i).tolist()) for i in range(cache.n_documents)] == encoded
    meta = json.loads((tmp_path / "cache" / "train.json").read_text())
    assert meta["length"] == len(cache) and meta["n_documents"] == len(docs) and meta["dtype"] == "uint8"
    assert meta["tokenizer"]["name"] == "bytes" and len(meta["files"]) == 4
    assert {"path", "size", "mtime_ns", "format"} <= set(meta["files"][0])
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["train.bin", "train.json", "train.starts.bin"]
    with pytest.raises(ValueError, match=r"must end in \.bin"):
        corpus.build_token_cache(root, tokenizers.ByteTokenizer(), tmp_path / "cache" / "train")


def test_the_cache_is_reused_until_the_source_or_tokenizer_changes(tmp_path):
    path = write(tmp_path / "t.txt", TEXT)
    bin_path = tmp_path / "t.bin"
    first = corpus.build_token_cache(path, tokenizers.ByteTokenizer(), bin_path)
    stamp = bin_path.stat().st_mtime_ns
    again = corpus.build_token_cache(path, tokenizers.ByteTokenizer(), bin_path)
    assert first.built and not again.built and bin_path.stat().st_mtime_ns == stamp
    assert torch.equal(again.tokens, first.tokens)
    write(path, TEXT + "more text\n")
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    changed = corpus.build_token_cache(path, tokenizers.ByteTokenizer(), bin_path)
    assert changed.built and bytes(changed.tokens.tolist()) == (TEXT + "more text\n").encode("utf-8")
    (tmp_path / "t.json").write_text("{not json")  # a damaged sidecar: built again
    assert corpus.build_token_cache(path, tokenizers.ByteTokenizer(), bin_path).built
    assert corpus.build_token_cache(path, tokenizers.ByteTokenizer(), bin_path, rebuild=True).built
    opened = corpus.open_token_cache(bin_path)
    assert not opened.built and torch.equal(opened.tokens, changed.tokens)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")], "temporary files are renamed or removed"
    if _has_tokenizers():
        bpe = tokenizers.BPETokenizer.train(corpus.iter_texts(path), vocab_size=280)
        rebuilt = corpus.build_token_cache(path, bpe, bin_path)
        assert rebuilt.built and rebuilt.tokens.dtype == torch.uint16 and rebuilt.vocab_size == bpe.vocab_size
        assert rebuilt.tokens.tolist() == bpe.encode(TEXT + "more text\n")
        assert not corpus.build_token_cache(path, bpe, bin_path).built


def _has_tokenizers() -> bool:
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        return False
    return True


def test_a_bpe_cache_decodes_to_its_documents(tmp_path):
    pytest.importorskip("tokenizers")
    root = folder(tmp_path)
    write(root / "long.txt", "".join(f"line {i} of a longer file, words words words\n" for i in range(300)))
    bpe = tokenizers.BPETokenizer.train(corpus.iter_texts(root), vocab_size=320)
    cache = corpus.build_token_cache(root, bpe, tmp_path / "bpe.bin", block_chars=500)
    assert [bpe.decode(cache.document(i)) for i in range(cache.n_documents)] == documents_of(root)


def test_the_cache_is_memory_mapped_not_read_into_memory(tmp_path):
    statm = Path("/proc/self/statm")
    if not statm.exists():
        pytest.skip("needs /proc/self/statm (Linux) to measure resident memory")
    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        return int(statm.read_text().split()[1]) * page

    line = "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ\n"
    size = 24 * 2**20
    path = write(tmp_path / "big.txt", line * (size // len(line)))
    tracemalloc.start()
    try:
        built = corpus.build_token_cache(path, tokenizers.ByteTokenizer(), tmp_path / "big.bin", block_chars=1 << 18)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(built) >= size - len(line)
    assert peak < size / 8, f"building streamed in blocks: Python's peak was {peak / 2**20:.1f} MiB"
    before = rss()  # (``built`` stays alive: were it a copy, freeing it could leave memory for the next to reuse)
    cache = corpus.open_token_cache(tmp_path / "big.bin")
    x, _ = cache.random_windows(8, 256, torch.Generator().manual_seed(0))
    grown = rss() - before
    assert grown < size / 4, f"opening a {size >> 20} MiB cache and reading windows grew RSS by {grown >> 20} MiB"
    assert x.shape == (8, 256)


def test_windows_are_slices_of_the_tokens(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", [f"document number {i} " * (i % 5 + 1) for i in range(40)])
    cache = corpus.build_token_cache(path, tokenizers.ByteTokenizer(), tmp_path / "d.bin")
    flat = cache.tokens.long()
    x, y = cache.random_windows(6, 16, torch.Generator().manual_seed(1))
    assert x.shape == y.shape == (6, 16) and x.dtype == torch.long
    for xi, yi in zip(x, y, strict=True):
        s = next(s for s in range(len(flat) - 16) if torch.equal(flat[s : s + 16], xi))
        assert torch.equal(flat[s + 1 : s + 17], yi)
    batches = cache.fixed_windows(4, 16, 3)
    assert len(batches) == 3 and all(b[0].shape == (4, 16) for b in batches)
    assert torch.equal(batches[0][0][0], flat[:16]) and torch.equal(batches[-1][1][-1], flat[-16:])
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, cache.fixed_windows(4, 16, 3), strict=True))
    with pytest.raises(ValueError, match="too few"):
        cache.random_windows(1, len(cache), torch.Generator())


def test_packed_rows_follow_pack_documents_from_where_they_start(tmp_path):
    texts = [f"doc {i}: " + "abcdefgh"[: i % 8] * (i % 4 + 1) for i in range(30)] + ["L" * 50, "x", "tail words"]
    path = jsonl(tmp_path / "d.jsonl", texts)
    cache = corpus.build_token_cache(path, tokenizers.ByteTokenizer(), tmp_path / "d.bin")
    docs = [torch.tensor(list(t.encode("utf-8"))) for t in texts]
    L = 24
    for k in (0, 5, 29, 30):  # at a document's start: row 0 of packing the documents from there
        x, y, cu = cache.packed_at([int(cache.doc_starts[k])], L)
        want_x, want_y, want_cu = pack_documents(docs[k:], L).batch([0])
        assert torch.equal(x, want_x) and torch.equal(y, want_y) and torch.equal(cu, want_cu)
    inside = int(cache.doc_starts[30]) + 7  # inside the long document: the rest of it, cut at the row's end
    x, y, cu = cache.packed_at([inside], L)
    long_doc = docs[30]
    assert torch.equal(x[0], long_doc[7 : 7 + L]) and torch.equal(y[0], long_doc[8 : 8 + L]) and cu.tolist() == [0, L]
    x, y, cu = cache.random_packed(5, L, torch.Generator().manual_seed(2))
    assert x.shape == y.shape == (1, 5 * L) and cu[0] == 0 and cu[-1] == 5 * L
    assert set(range(0, 5 * L, L)) <= set(cu.tolist()), "every row starts a sequence"
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):  # inside a sequence, the target is the next input
        counted = (y[0, a : b - 1] != IGNORE).nonzero().flatten() + a
        assert torch.equal(y[0, counted], x[0, counted + 1])
    positions = cache.random_positions(4, torch.Generator().manual_seed(3))
    rows = cache.rows_at(positions, L)
    assert len(rows) == 4 and rows.seq_len == L and torch.equal(rows.n_real, rows.inputs.ne(0).sum(1))
    batch = rows.batch(torch.arange(4))
    assert all(torch.equal(a, b) for a, b in zip(batch, cache.packed_at(positions, L), strict=True))
    val = cache.fixed_packed(3, L, 2)
    assert len(val) == 2 and all(v[0].shape == (1, 3 * L) for v in val)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(val, cache.fixed_packed(3, L, 2), strict=True))


def test_split_holds_out_the_last_documents(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", [f"document {i}" for i in range(20)])
    cache = corpus.build_token_cache(path, tokenizers.ByteTokenizer(), tmp_path / "d.bin")
    train, val = cache.split(0.1)
    assert train.n_documents == 18 and val.n_documents == 2 and len(train) + len(val) == len(cache)
    assert bytes(val.document(0).tolist()) == b"document 18" and bytes(val.document(1).tolist()) == b"document 19"
    assert bytes(train.document(17).tolist()) == b"document 17"
    one = corpus.build_token_cache(write(tmp_path / "t.txt", TEXT * 10), tokenizers.ByteTokenizer(), tmp_path / "t.bin")
    train, val = one.split(0.25)
    assert len(val) == int(len(one) * 0.25) and val.doc_starts.tolist() == [0] and train.doc_starts.tolist() == [0]
    assert torch.equal(torch.cat([train.tokens, val.tokens]), one.tokens)
