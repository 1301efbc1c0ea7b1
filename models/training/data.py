"""The data pipeline: the embedded corpus, text files, folders of them and JSONL, read as documents and streamed
into the token cache, a memory-mapped file of token ids with the documents' starts beside it, from which training
draws windows or packed rows.

The embedded corpus is the English help text every Python installation carries (``pydoc_data.topics``, about
465 KB: the language reference behind ``help("if")``), so training needs no download.

``iter_texts`` (or ``iter_pieces``, which also says where documents start) reads a file or a folder a line or a
block at a time, never a whole file. ``build_token_cache`` tokenizes it once into ``NAME.bin`` (the token ids),
``NAME.starts.bin`` (each document's first token) and ``NAME.json`` (what they were built from); a later call with
the same files and tokenizer reuses them. ``open_token_cache`` maps them into memory (``torch.from_file``: pages
are read from disk as they are touched), and a ``TokenCache`` draws windows or packed rows from them without
reading the whole file. Packed rows follow ``pack_documents``'s rules: no document crosses a row's sequences.
See docs/training-data.md.
"""

from __future__ import annotations

import array
import json
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from models.config import ConfigError
from models.training.tokenizers import ByteTokenizer, Tokenizer

TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
FORMATS = ("auto", "text", "jsonl")
TEXT_DOCUMENTS = ("file", "lines", "separator")
BLOCK_CHARS = 1 << 20  # the most characters of a text file read (and tokenized) at once
CACHE_VERSION = 2  # 2: the sidecar records checksums and the largest id
SCAN_BYTES = 1 << 20  # a cache file is read this much at a time to check it
IGNORE = -100  # the target of a position that is not trained on (``F.cross_entropy``'s default ignore_index)


def default_corpus() -> bytes:
    """The pydoc topics, in a fixed (sorted) order, as UTF-8 bytes."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name].strip() for name in sorted(topics)).encode("utf-8")


class DocumentError(ConfigError):
    """The training data cannot be read as documents (a bad JSONL line, too few documents). A ``ConfigError``,
    so that ``seqmixers train`` reports it in one line."""


# Reading files ------------------------------------------------------------------------------------------


def source_files(source: str | Path, *, fmt: str = "auto") -> list[tuple[Path, str]]:
    """The files of ``source`` with the format each is read in (``"text"`` or ``"jsonl"``).

    A file is read as given (``fmt="auto"``: JSONL if its name ends in ``.jsonl`` or ``.ndjson``, else text).
    A folder gives its files, recursively, in sorted order of their paths below it, skipping hidden files and
    folders (names starting with ``.``): with ``"auto"`` both its text files (``TEXT_SUFFIXES``: ``.txt``,
    ``.text``, ``.md``, ``.rst``) and its JSONL files (``JSONL_SUFFIXES``), with ``"text"`` or ``"jsonl"`` only
    those. A folder without any raises ``FileNotFoundError``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {list(FORMATS)}, got {fmt!r}")
    path = Path(source)

    def kind(p: Path) -> str:
        return fmt if fmt != "auto" else ("jsonl" if p.suffix.lower() in JSONL_SUFFIXES else "text")

    if path.is_file():
        return [(path, kind(path))]
    if not path.is_dir():
        raise FileNotFoundError(f"data {str(path)!r} is neither a file nor a folder")
    suffixes = {"auto": TEXT_SUFFIXES + JSONL_SUFFIXES, "text": TEXT_SUFFIXES, "jsonl": JSONL_SUFFIXES}[fmt]
    found = []
    for root, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            p = Path(root, name)
            if not name.startswith(".") and p.suffix.lower() in suffixes and p.is_file():
                found.append(p)
    if not found:
        raise FileNotFoundError(f"data folder {str(path)!r} holds no files ending in {', '.join(suffixes)}")
    found.sort(key=lambda p: p.relative_to(path).parts)
    return [(p, kind(p)) for p in found]


def _text_pieces(path: Path, documents: str, separator: str, block_chars: int) -> Iterator[tuple[str, bool]]:
    # newline="": line endings are kept as they are (\n, \r\n, \r); invalid UTF-8 becomes U+FFFD.
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        if documents == "file":
            first, carry = True, ""
            while block := f.read(block_chars):
                text = carry + block
                cut = text.rfind("\n") + 1  # end a piece at its last line end, so that words stay whole
                piece, carry = (text[:cut], text[cut:]) if cut else (text, "")
                yield piece, first
                first = False
            if carry:
                yield carry, first
            return
        if documents == "separator":
            yield from _separated(f, separator, block_chars)
            return
        first = True  # the next non-empty piece starts a document
        while line := f.readline(block_chars):  # at most block_chars characters: a long line comes in pieces
            ends = line.endswith(("\n", "\r"))
            text = line.rstrip("\r\n") if ends else line
            if text:
                yield text, first
                first = False
            if ends:
                first = True


def _separated(f, separator: str, block_chars: int) -> Iterator[tuple[str, bool]]:
    first, carry, keep = True, "", len(separator) - 1  # keep: what may be the start of a separator
    while block := f.read(block_chars):
        *done, rest = (carry + block).split(separator)
        for part in done:  # each is followed by a separator: the next piece starts a document
            if part:
                yield part, first
            first = True
        cut = max(0, len(rest) - keep)
        if cut:
            yield rest[:cut], first
            first = False
        carry = rest[cut:]
    if carry:
        yield carry, first


def _jsonl_pieces(path: Path, field: str) -> Iterator[tuple[str, bool]]:
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if line.strip() and (text := jsonl_text(line, field, f"{path}:{number}")):
                yield text, True


def iter_pieces(
    source: str | Path,
    *,
    fmt: str = "auto",
    field: str = "text",
    documents: str = "file",
    separator: str = "\n\n",
    block_chars: int = BLOCK_CHARS,
) -> Iterator[tuple[str, bool]]:
    """``(text, starts_document)`` pieces of ``source`` (see ``source_files``), in order; the pieces of a document,
    joined, are the document. Empty documents are left out.

    Text files are read ``block_chars`` characters at a time (cut after the block's last line end, if it has
    one), as UTF-8 with invalid bytes replaced by U+FFFD and line endings kept as they are. ``documents``: each
    text file is one document (``"file"``); or each of its non-empty lines is one, without its line ending
    (``"lines"``: ``\n``, ``\r\n`` or ``\r``); or each non-empty piece between occurrences of ``separator``
    (``"separator"``), the same whatever ``block_chars`` is. A document longer than ``block_chars`` comes in
    several pieces.
    JSONL files are read a line at a time: each line one object whose string ``field`` is a document. A line that
    is not raises ``DocumentError`` naming the file and line number.
    """
    if documents not in TEXT_DOCUMENTS:
        raise ValueError(f"documents must be one of {list(TEXT_DOCUMENTS)}, got {documents!r}")
    if isinstance(block_chars, bool) or not isinstance(block_chars, int) or block_chars < 1:
        raise ValueError(f"block_chars must be an int >= 1, got {block_chars!r}")
    if documents == "separator" and (not isinstance(separator, str) or not separator):
        raise ValueError(f"separator must be a non-empty string, got {separator!r}")
    for path, kind in source_files(source, fmt=fmt):
        if kind == "jsonl":
            yield from _jsonl_pieces(path, field)
        else:
            yield from _text_pieces(path, documents, separator, block_chars)


def iter_texts(
    source: str | Path,
    *,
    fmt: str = "auto",
    field: str = "text",
    documents: str = "file",
    separator: str = "\n\n",
    block_chars: int = BLOCK_CHARS,
) -> Iterator[str]:
    """The text of ``source`` in pieces (``iter_pieces`` without the document starts): what BPE trains on."""
    options = {"fmt": fmt, "field": field, "documents": documents, "separator": separator}
    for text, _ in iter_pieces(source, **options, block_chars=block_chars):
        yield text


# Documents and packed rows ----------------------------------------------------------------------------


def jsonl_text(line: bytes, field: str, where: str) -> str:
    """The string ``field`` of the JSON object on one JSONL ``line``; a line that is not one raises
    ``DocumentError`` naming ``where`` it is and what was expected."""
    expected = f"one JSON object per line with a string field {field!r}"
    try:
        record = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DocumentError(f"{where}: not valid JSON ({exc}); expected {expected}") from None
    if not isinstance(record, dict):
        raise DocumentError(f"{where}: a {type(record).__name__}, not an object; expected {expected}")
    if field not in record:
        raise DocumentError(f"{where}: no field {field!r} (it has {sorted(record)[:10]}); expected {expected}")
    text = record[field]
    if not isinstance(text, str):
        raise DocumentError(f"{where}: field {field!r} is a {type(text).__name__}, not a string; expected {expected}")
    return text


@dataclass
class PackedRows:
    """Documents packed into ``R`` fixed-length rows of ``seq_len`` input tokens (``pack_documents``).

    ``inputs [R, L]`` (the documents' dtype; 0 at padding), ``targets [R, L]`` (the same dtype; meaningful
    where ``counted``), ``counted [R, L]`` bool (the positions trained on), ``starts [R, L]`` bool (where a
    sequence starts; always at 0), ``n_real [R]`` (the tokens of each row that are not padding).
    ``rows[i]`` is row i as ``(inputs [L], targets [L] int64 with IGNORE, cu_seqlens [n+1] int64)``.
    """

    inputs: Tensor
    targets: Tensor
    counted: Tensor
    starts: Tensor
    n_real: Tensor

    def __len__(self) -> int:
        return self.inputs.shape[0]

    @property
    def seq_len(self) -> int:
        return self.inputs.shape[1]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        x, y, cu = self.batch(torch.tensor([i]))
        return x[0], y[0], cu

    def batch(self, rows: Tensor | list[int]) -> tuple[Tensor, Tensor, Tensor]:
        """Rows ``rows`` (B indices) flattened into one packed row: ``(x [1, B*L], y [1, B*L], cu_seqlens [N+1])``,
        int64; ``y`` is ``IGNORE`` where nothing is trained; ``cu_seqlens`` joins the rows' boundaries."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        x = self.inputs[rows].long().flatten()
        y = torch.where(self.counted[rows], self.targets[rows].long(), IGNORE).flatten()
        starts = self.starts[rows].flatten().nonzero().flatten()
        cu = torch.cat([starts, torch.tensor([x.numel()])])
        return x[None], y[None], cu


def pack_documents(docs: list[Tensor], seq_len: int) -> PackedRows:
    """Pack tokenized documents, in order, into rows of ``seq_len`` input tokens.

    A document of n tokens is trained as on its own: position i predicts token i + 1, so it has n - 1 counted
    targets, and its last token's target is ignored. Documents of fewer than 2 tokens predict nothing and are
    left out. The rule, going through the documents in order with a cursor in the current row:

    - a document that fits in the room left in the row goes there, as its own sequence (a boundary at its
      start: it starts at position 0 and sees nothing before it);
    - a document that fits in a row (n <= seq_len) but not in the room starts a new row; the room left is
      padding (input 0, no target), a separate sequence of its own, so no real token attends to it;
    - a longer document is cut: its pieces fill the room, then whole rows, and its rest goes on in the next
      row. Each piece is a new sequence (no state or attention from the piece before); the target of a
      piece's last token is the document's real next token, the first token of the next piece.
    - the last row is filled with padding.

    So every counted target is the next token of the same document, no target or attention crosses a
    document, every document has exactly n - 1 counted targets, and a document of at most ``seq_len``
    tokens gets exactly the loss that running it alone gives. Rows with no counted target (the one-token
    end of a cut document, then padding) are left out.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be an int >= 1, got {seq_len!r}")
    docs = [d.flatten() for d in docs if d.numel() >= 2]
    dtype = docs[0].dtype if docs else torch.long
    lengths = [d.numel() for d in docs]
    doc_starts, pad_starts, pos = [], [], 0
    for n in lengths:
        room = seq_len - pos % seq_len
        if room < n <= seq_len:
            pad_starts.append(pos)
            pos += room
        doc_starts.append(pos)
        pos += n
    total = -(-pos // seq_len) * seq_len
    if pos < total:
        pad_starts.append(pos)
    stream = torch.cat(docs).to(dtype) if docs else torch.zeros(0, dtype=dtype)
    lengths_t = torch.tensor(lengths, dtype=torch.long)
    doc_starts_t = torch.tensor(doc_starts, dtype=torch.long)
    offsets = torch.cumsum(lengths_t, 0) - lengths_t  # each document's start in the stream
    dest = torch.arange(len(stream)) + torch.repeat_interleave(doc_starts_t - offsets, lengths_t)
    inputs = torch.zeros(total, dtype=dtype)
    targets = torch.zeros(total, dtype=dtype)
    counted = torch.zeros(total, dtype=torch.bool)
    real = torch.zeros(total, dtype=torch.bool)
    starts = torch.zeros(total, dtype=torch.bool)
    inputs[dest] = stream
    targets[dest[:-1]] = stream[1:]
    is_last = torch.zeros(len(stream), dtype=torch.bool)
    is_last[offsets + lengths_t - 1] = True
    counted[dest] = ~is_last
    real[dest] = True
    starts[doc_starts_t] = True
    starts[torch.tensor(pad_starts, dtype=torch.long)] = True
    starts[::seq_len] = True
    keep = counted.view(-1, seq_len).any(1)
    view = [t.view(-1, seq_len)[keep] for t in (inputs, targets, counted, starts, real)]
    return PackedRows(*view[:4], n_real=view[4].sum(1))


# The token cache ----------------------------------------------------------------------------------------


def token_dtype(vocab_size: int) -> torch.dtype:
    """The smallest unsigned dtype that holds ids ``0 .. vocab_size - 1``: uint8 (bytes), uint16 or uint32."""
    if vocab_size <= 1 << 8:
        return torch.uint8
    if vocab_size <= 1 << 16:
        return torch.uint16
    if vocab_size <= 1 << 32:
        return torch.uint32
    raise ValueError(f"vocab_size {vocab_size} does not fit in uint32")


_DTYPES = {"uint8": torch.uint8, "uint16": torch.uint16, "uint32": torch.uint32, "int64": torch.int64}


def _typecode(dtype: torch.dtype) -> str:
    size = {torch.uint8: 1, torch.uint16: 2, torch.uint32: 4}[dtype] if dtype != torch.int64 else 8
    signed = dtype == torch.int64
    for code in "bhilq" if signed else "BHILQ":
        if array.array(code).itemsize == size:
            return code
    raise RuntimeError(f"no array typecode of {size} bytes")  # pragma: no cover


def cache_paths(cache_path: str | Path) -> tuple[Path, Path, Path]:
    """``(tokens, starts, sidecar)`` for ``cache_path`` = ``NAME.bin``: ``NAME.bin``, ``NAME.starts.bin``,
    ``NAME.json``."""
    path = Path(cache_path)
    if path.suffix != ".bin":
        raise ValueError(f"the cache path must end in .bin, got {str(path)!r}")
    return path, path.with_suffix(".starts.bin"), path.with_suffix(".json")


def _fingerprint(source: str | Path, tokenizer: Tokenizer, fmt: str, field: str, documents: str, sep: str) -> dict:
    files = []
    for path, kind in source_files(source, fmt=fmt):
        st = path.stat()
        files.append({"path": str(path.resolve()), "format": kind, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return {
        "version": CACHE_VERSION,
        "files": files,
        "field": field,
        "documents": documents,
        "separator": sep if documents == "separator" else None,
        "tokenizer": {"name": tokenizer.name, "fingerprint": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size},
    }


class TokenCacheError(ConfigError):
    """A token cache that must not be trained on: damaged (its files do not hold what its sidecar records), or
    holding ids its tokenizer does not have. A ``ConfigError``: ``seqmixers`` says it in one line (exit 2)."""


def _read_meta(path: Path) -> dict | None:
    """The sidecar, or ``None`` when there is none; one that is not a JSON object raises ``TokenCacheError``."""
    try:
        meta = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise TokenCacheError(f"the token cache's sidecar {path} is damaged: not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise TokenCacheError(f"the token cache's sidecar {path} is damaged: a {type(meta).__name__}, not an object")
    return meta


def _largest(ids: Tensor) -> int:
    """The largest of the unsigned ``ids`` (-1 when there are none). torch reduces uint16 and uint32 on the CPU
    only through their signed views: flipping the top bit maps the unsigned order onto the signed one."""
    if ids.numel() == 0:
        return -1
    if ids.dtype == torch.uint8:
        return int(ids.max())
    signed = ids.view(torch.int16 if ids.dtype == torch.uint16 else torch.int32)
    low, high = torch.aminmax(signed)
    if low >= 0:
        return int(high)
    half = 1 << (8 * signed.element_size() - 1)
    return int((signed ^ -half).max()) + half


def _scan(path: Path, dtype: torch.dtype) -> tuple[int, int]:
    """``(CRC-32, largest value)`` of a cache file of ``dtype`` values (the largest only for token ids), read
    ``SCAN_BYTES`` at a time."""
    crc, largest, buffer = 0, -1, bytearray(SCAN_BYTES)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            chunk = memoryview(buffer)[:n]
            crc = zlib.crc32(chunk, crc)
            if dtype != torch.int64:
                largest = max(largest, _largest(torch.frombuffer(chunk, dtype=dtype)))
    return crc, largest


def _check(meta: dict, tokens_path: Path, starts_path: Path, vocab_size: int | None = None) -> None:
    """Raise ``TokenCacheError`` unless the cache files hold exactly what the sidecar ``meta`` records (sizes,
    CRC-32 checksums, the largest id, ascending document starts inside the tokens) and every id is below
    ``vocab_size`` (default: the vocabulary the sidecar records). Reads both files once."""
    meta_name = tokens_path.with_suffix(".json").name

    def damaged(what: str) -> TokenCacheError:
        return TokenCacheError(f"the token cache {tokens_path} is damaged: {what}")

    def whole(value: object, low: int) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= low

    tok, crc = meta.get("tokenizer"), meta.get("crc32")
    fields = {
        "dtype": meta.get("dtype") in ("uint8", "uint16", "uint32"),
        "length": whole(meta.get("length"), 0),
        "n_documents": whole(meta.get("n_documents"), 0),
        "max_id": whole(meta.get("max_id"), -1),
        "crc32": isinstance(crc, dict) and all(whole(crc.get(k), 0) for k in ("tokens", "starts")),
        "tokenizer": isinstance(tok, dict) and whole(tok.get("vocab_size"), 1),
    }
    if not all(fields.values()):
        bad = ", ".join(k for k, ok in fields.items() if not ok)
        raise damaged(f"its sidecar {meta_name} has no valid {bad}")
    dtype = _DTYPES[meta["dtype"]]
    if dtype != token_dtype(tok["vocab_size"]):
        raise damaged(f"its sidecar records {meta['dtype']} ids for a vocabulary of {tok['vocab_size']}")
    for path, n, itemsize in ((tokens_path, meta["length"], dtype.itemsize), (starts_path, meta["n_documents"], 8)):
        size = path.stat().st_size if path.is_file() else None
        if size != n * itemsize:
            has = "is missing" if size is None else f"holds {size} bytes"
            raise damaged(f"{path.name} {has}, where {meta_name} records {n} values of {itemsize} bytes")
    tokens_crc, largest = _scan(tokens_path, dtype)
    if tokens_crc != meta["crc32"]["tokens"]:
        raise damaged(f"{tokens_path.name} does not match its checksum (CRC-32 {tokens_crc:08x}, recorded "
                      f"{meta['crc32']['tokens']:08x})")  # fmt: skip
    if largest != meta["max_id"]:
        raise damaged(f"its largest token id is {largest}, where {meta_name} records {meta['max_id']}")
    starts_crc, _ = _scan(starts_path, torch.int64)
    if starts_crc != meta["crc32"]["starts"]:
        raise damaged(f"{starts_path.name} does not match its checksum (CRC-32 {starts_crc:08x}, recorded "
                      f"{meta['crc32']['starts']:08x})")  # fmt: skip
    starts = _map(starts_path, meta["n_documents"], torch.int64)
    if starts.numel() and not (
        int(starts[0]) == 0 and int(starts[-1]) < meta["length"] and bool((starts[1:] > starts[:-1]).all())
    ):
        raise damaged(f"{starts_path.name} does not hold ascending document starts from 0 below {meta['length']}")
    vocab = tok["vocab_size"] if vocab_size is None else vocab_size
    if largest >= vocab:
        raise TokenCacheError(
            f"the token cache {tokens_path} holds token id {largest}, beyond the tokenizer's {vocab} ids (0 to "
            f"{vocab - 1}): it was made for another tokenizer"
        )


def _matches(meta: dict | None, want: dict) -> bool:
    """Whether the sidecar ``meta`` was written for ``want``'s files, options and tokenizer."""
    return meta is not None and all(meta.get(k) == v for k, v in want.items())


def build_token_cache(
    source: str | Path,
    tokenizer: Tokenizer,
    cache_path: str | Path,
    *,
    fmt: str = "auto",
    field: str = "text",
    documents: str = "file",
    separator: str = "\n\n",
    block_chars: int = BLOCK_CHARS,
    rebuild: bool = False,
) -> TokenCache:
    """Tokenize ``source`` (see ``iter_pieces``) into the cache at ``cache_path`` (``NAME.bin``) and open it.

    Writes the tokens (``token_dtype(tokenizer.vocab_size)``, native byte order), every document's first token
    index (int64, ``NAME.starts.bin``) and a JSON sidecar (``NAME.json``: the source files with their sizes and
    modification times, the tokenizer's name and fingerprint, dtype, length, number of documents, the largest id
    and both files' CRC-32), a block at a time, to temporary files renamed into place, the sidecar last. If the
    sidecar already there matches (same files, sizes, mtimes, format options and tokenizer) and the files pass
    ``open_token_cache``'s checks (checksums, sizes, ids below the vocabulary, document starts), the cache is
    reused as it is (``TokenCache.built`` is False). Otherwise (or with ``rebuild``) it is built again; when an
    existing cache failed the checks, ``TokenCache.damaged`` says how. Processes building the same cache at once
    (the ranks of a run) each write their own temporary files, and the last rename wins; better, rank 0 builds
    it and the others ``open_token_cache`` it after a barrier.

    Tokens are the concatenation of ``tokenizer.encode`` of each piece; for bytes that is the documents' UTF-8
    bytes exactly. For BPE, a document is tokenized whole unless it is longer than ``block_chars``; then it is
    tokenized in pieces, which (with ``documents="file"``) end at line ends where the text has them.
    """
    tokens_path, starts_path, meta_path = cache_paths(cache_path)
    want = _fingerprint(source, tokenizer, fmt, field, documents, separator)
    damaged = None
    if not rebuild:
        try:
            meta = _read_meta(meta_path)
            if _matches(meta, want):
                _check(meta, tokens_path, starts_path, tokenizer.vocab_size)
                return _open(tokens_path, starts_path, meta, built=False)
        except TokenCacheError as exc:
            damaged = str(exc)

    dtype = token_dtype(tokenizer.vocab_size)
    code, start_code = _typecode(dtype), _typecode(torch.int64)
    tokens_path.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}.{os.urandom(4).hex()}"  # builders in several processes never share a temporary file
    tmp = {p: p.with_name(f".{p.name}.{tag}.tmp") for p in (tokens_path, starts_path, meta_path)}
    batch_chars = max(block_chars, 1 << 16)
    n_tokens = n_docs = tokens_crc = starts_crc = 0
    largest = -1
    try:
        with open(tmp[tokens_path], "wb") as ftok, open(tmp[starts_path], "wb") as fstart:

            def flush(pieces: list[tuple[str, bool]]) -> None:
                nonlocal n_tokens, n_docs, tokens_crc, starts_crc, largest
                if isinstance(tokenizer, ByteTokenizer):  # the same ids, without a list of ints per byte
                    encoded = [p.encode("utf-8") for p, _ in pieces]
                elif hasattr(tokenizer, "encode_batch"):
                    encoded = tokenizer.encode_batch([p for p, _ in pieces])
                else:
                    encoded = [tokenizer.encode(p) for p, _ in pieces]
                starts = array.array(start_code)
                out = array.array(code)
                for (_, first), ids in zip(pieces, encoded, strict=True):
                    if first:
                        starts.append(n_tokens + len(out))
                    if isinstance(ids, bytes):
                        out.frombytes(ids)  # bytes: uint8, typecode "B"
                    else:
                        out.extend(ids)  # OverflowError if an id does not fit the dtype
                starts.tofile(fstart)
                out.tofile(ftok)
                tokens_crc, starts_crc = zlib.crc32(out, tokens_crc), zlib.crc32(starts, starts_crc)
                if out:
                    largest = max(largest, _largest(torch.frombuffer(out, dtype=dtype)))
                n_tokens += len(out)
                n_docs += len(starts)

            pending, chars = [], 0
            options = {"fmt": fmt, "field": field, "documents": documents, "separator": separator}
            for piece in iter_pieces(source, **options, block_chars=block_chars):
                pending.append(piece)
                chars += len(piece[0])
                if chars >= batch_chars:
                    flush(pending)
                    pending, chars = [], 0
            if pending:
                flush(pending)
        if largest >= tokenizer.vocab_size:
            raise ValueError(f"the tokenizer {tokenizer!r} gave id {largest}, beyond its {tokenizer.vocab_size} ids")
        meta = {
            **want,
            "dtype": str(dtype).removeprefix("torch."),
            "length": n_tokens,
            "n_documents": n_docs,
            "max_id": largest,
            "crc32": {"tokens": tokens_crc, "starts": starts_crc},
        }
        tmp[meta_path].write_text(json.dumps(meta, indent=1) + "\n")
        meta_path.unlink(missing_ok=True)  # no moment where an old sidecar describes new tokens
        os.replace(tmp[tokens_path], tokens_path)
        os.replace(tmp[starts_path], starts_path)
        os.replace(tmp[meta_path], meta_path)
    finally:
        for p in tmp.values():
            p.unlink(missing_ok=True)
    return _open(tokens_path, starts_path, meta, built=True, damaged=damaged)


def _map(path: Path, n: int, dtype: torch.dtype) -> Tensor:
    if n == 0:
        return torch.zeros(0, dtype=dtype)
    # shared=False: a private mapping of the file; pages are read as they are touched, never written back.
    return torch.from_file(str(path), shared=False, size=n, dtype=dtype)


def _open(tokens_path: Path, starts_path: Path, meta: dict, *, built: bool, damaged: str | None = None) -> TokenCache:
    tokens = _map(tokens_path, meta["length"], _DTYPES[meta["dtype"]])
    starts = _map(starts_path, meta["n_documents"], torch.int64)
    vocab_size = meta["tokenizer"]["vocab_size"]
    return TokenCache(tokens, starts, vocab_size, meta=meta, path=tokens_path, built=built, damaged=damaged)


def open_token_cache(cache_path: str | Path, *, tokenizer: Tokenizer | None = None) -> TokenCache:
    """The cache at ``cache_path`` (``NAME.bin``, beside it ``NAME.starts.bin`` and ``NAME.json``),
    memory-mapped, after checking it: both files match the sizes and CRC-32 checksums its sidecar records, the
    largest id (read again) is the one recorded and below the vocabulary (``tokenizer``'s, which must be the one
    the cache was built with, else the one recorded), and the document starts ascend from 0 inside the tokens.
    This reads both files once (docs/training-data.md gives the cost). A cache that fails raises
    ``TokenCacheError`` naming the file and what is wrong: it is never trained on."""
    tokens_path, starts_path, meta_path = cache_paths(cache_path)
    meta = _read_meta(meta_path)
    if meta is None:
        raise FileNotFoundError(f"no token cache at {str(tokens_path)!r} (its sidecar {meta_path.name} is missing)")
    if meta.get("version") != CACHE_VERSION:
        raise TokenCacheError(
            f"the token cache {tokens_path} has version {meta.get('version')!r}, not {CACHE_VERSION}: build it again "
            f"(build_token_cache, or a run on its data, rebuilds it)"
        )
    if tokenizer is not None:
        made_with = meta.get("tokenizer") if isinstance(meta.get("tokenizer"), dict) else {}
        if made_with.get("fingerprint") != tokenizer.fingerprint:
            raise TokenCacheError(
                f"the token cache {tokens_path} was built with another tokenizer ({made_with.get('name')!r}, "
                f"fingerprint {made_with.get('fingerprint')!r}) than {tokenizer!r}: its ids mean other tokens"
            )
    try:
        _check(meta, tokens_path, starts_path, tokenizer.vocab_size if tokenizer is not None else None)
    except TokenCacheError as exc:
        raise TokenCacheError(f"{exc}; it is not used: delete {tokens_path.name}, {starts_path.name} and "
                              f"{meta_path.name} and build it again from the data") from None  # fmt: skip
    return _open(tokens_path, starts_path, meta, built=False)


@dataclass
class TokenCache:
    """Token ids ``tokens [N]`` (uint8/16/32) and the documents' first token indices ``doc_starts [D]`` (int64,
    ascending), each a tensor over a memory-mapped file (or a view of one): slicing reads only the pages it
    touches. Do not write into them (the writes would stay in this process; the files are never changed).

    ``split`` cuts it into training and validation parts; ``random_windows``/``fixed_windows`` give windows
    ``(x [B, T], y [B, T])`` int64 (targets: the inputs shifted by one); ``random_packed``/``fixed_packed`` give
    packed rows ``(x [1, B*L], y [1, B*L], cu_seqlens)`` (``pack_documents``'s rules), built from the few
    documents each row needs.
    Picking and reading are separate, for a trainer that picks a global batch with one generator on every rank
    and reads only its own part: ``random_window_starts`` then ``windows_at``; ``random_positions`` then
    ``rows_at`` (or ``packed_at``).
    """

    tokens: Tensor
    doc_starts: Tensor
    vocab_size: int
    meta: dict = field(default_factory=dict)
    path: Path | None = None
    built: bool = False
    damaged: str | None = None  # why the cache found there was not reused (build_token_cache rebuilt it)

    def __len__(self) -> int:
        return self.tokens.numel()

    @property
    def n_documents(self) -> int:
        return self.doc_starts.numel()

    def document(self, i: int) -> Tensor:
        """Document ``i``'s tokens (a view)."""
        end = int(self.doc_starts[i + 1]) if i + 1 < self.n_documents else len(self)
        return self.tokens[int(self.doc_starts[i]) : end]

    def split(self, val_fraction: float, *, by: str = "documents") -> tuple[TokenCache, TokenCache]:
        """``(train, val)``: the last ``val_fraction`` of the documents (at least one) is held out; with a single
        document, the last ``val_fraction`` of its tokens. ``by="tokens"``: the last ``int(N * val_fraction)``
        tokens, wherever documents start (for random windows). Views of the same
        files."""
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
        if by not in ("documents", "tokens"):
            raise ValueError(f"by must be 'documents' or 'tokens', got {by!r}")
        if by == "tokens":
            cut = len(self) - int(len(self) * val_fraction)
            first_val = int(torch.searchsorted(self.doc_starts, torch.tensor([cut]))) if self.n_documents else 0
        elif self.n_documents >= 2:
            n_val = max(1, int(self.n_documents * val_fraction))
            cut = int(self.doc_starts[self.n_documents - n_val])
            first_val = self.n_documents - n_val
        else:
            cut = len(self) - int(len(self) * val_fraction)
            first_val = self.n_documents
        train = TokenCache(self.tokens[:cut], self.doc_starts[:first_val], self.vocab_size, self.meta, self.path)
        val_starts = self.doc_starts[first_val:] - cut
        if val_starts.numel() == 0 or int(val_starts[0]) != 0:
            val_starts = torch.cat([torch.zeros(1, dtype=torch.long), val_starts])  # the cut starts a piece
        val = TokenCache(self.tokens[cut:], val_starts, self.vocab_size, self.meta, self.path)
        return train, val

    # windows

    def _check_windows(self, seq_len: int) -> None:
        if len(self) < seq_len + 1:
            raise ValueError(f"{len(self)} tokens are too few for windows of seq_len={seq_len} (+1 for the target)")

    def windows_at(self, starts: Tensor | list[int], seq_len: int) -> tuple[Tensor, Tensor]:
        """The windows ``tokens[s : s + seq_len + 1]``: inputs and next-token targets ``[B, seq_len]``, int64."""
        w = torch.stack([self.tokens[s : s + seq_len + 1].long() for s in torch.as_tensor(starts).tolist()])
        return w[:, :-1], w[:, 1:]

    def random_window_starts(self, batch_size: int, seq_len: int, generator: torch.Generator) -> Tensor:
        """The starts of ``batch_size`` random windows (for ``windows_at``); they may cross documents."""
        self._check_windows(seq_len)
        return torch.randint(0, len(self) - seq_len, (batch_size,), generator=generator)

    def random_windows(self, batch_size: int, seq_len: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``batch_size`` windows at random starts."""
        return self.windows_at(self.random_window_starts(batch_size, seq_len, generator), seq_len)

    def fixed_windows(self, batch_size: int, seq_len: int, n_batches: int) -> list[tuple[Tensor, Tensor]]:
        """``n_batches`` batches of windows spread evenly over the tokens (the same every time, for validation)."""
        self._check_windows(seq_len)
        starts = torch.linspace(0, len(self) - seq_len - 1, batch_size * n_batches).long()
        return [self.windows_at(part, seq_len) for part in starts.split(batch_size)]

    # packed rows

    def _row(self, position: int, seq_len: int) -> PackedRows:
        """One packed row (``pack_documents``'s rules) starting at token ``position``: the rest of the
        document holding it (a piece of it, when ``position`` is inside), then the documents after it while the
        row has room. Reads at most about ``2 * seq_len`` tokens per document it uses."""
        doc = int(torch.searchsorted(self.doc_starts, torch.tensor([position]), right=True)) - 1
        docs, total, end = [], 0, position
        while total < seq_len and end < len(self):
            nxt = int(self.doc_starts[doc + 1]) if doc + 1 < self.n_documents else len(self)
            piece = self.tokens[end : min(nxt, end + seq_len + 1)].long()  # longer than seq_len: cut the same way
            docs.append(piece)
            total += piece.numel()
            doc, end = doc + 1, nxt
        rows = pack_documents(docs, seq_len)
        if len(rows) == 0:  # nothing to predict from here (a 1-token end of the data): an all-ignored row
            z = torch.zeros(1, seq_len, dtype=torch.long)
            return PackedRows(z, z, z.bool(), torch.ones(1, seq_len, dtype=torch.bool), z[:, 0])
        return PackedRows(*(t[:1] for t in (rows.inputs, rows.targets, rows.counted, rows.starts, rows.n_real)))

    def rows_at(self, positions: Tensor | list[int], seq_len: int) -> PackedRows:
        """One packed row per position (see ``_row``), as ``PackedRows`` (int64): ``.batch(range(B))`` gives the
        packed batch, ``.n_real`` the real tokens of each row."""
        if self.n_documents == 0 or len(self) < 2:
            raise ValueError("the cache holds no document of 2 or more tokens to pack")
        rows = [self._row(p, seq_len) for p in torch.as_tensor(positions).tolist()]
        return PackedRows(*(torch.cat(parts) for parts in zip(*(_fields(r) for r in rows), strict=True)))

    def packed_at(self, positions: Tensor | list[int], seq_len: int) -> tuple[Tensor, Tensor, Tensor]:
        """Rows starting at token ``positions`` as one packed row ``(x [1, B*L], y [1, B*L], cu_seqlens [N+1])``,
        int64, ``y`` is ``IGNORE`` where nothing is trained (``PackedRows.batch``)."""
        rows = self.rows_at(positions, seq_len)
        return rows.batch(torch.arange(len(rows)))

    def random_positions(self, batch_size: int, generator: torch.Generator) -> Tensor:
        """``batch_size`` random row starts for ``rows_at``/``packed_at``: any token but the last, so that every
        part of a long document is trained, each document in proportion to its length."""
        return torch.randint(0, max(1, len(self) - 1), (batch_size,), generator=generator)

    def random_packed(self, batch_size: int, seq_len: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """``batch_size`` rows, each starting at a random token (``random_positions``)."""
        return self.packed_at(self.random_positions(batch_size, generator), seq_len)

    def fixed_packed(self, batch_size: int, seq_len: int, n_batches: int) -> list[tuple[Tensor, Tensor, Tensor]]:
        """``n_batches`` batches of rows starting at positions spread evenly (the same every time, for validation;
        rows may overlap when the tokens are fewer than ``batch_size * n_batches * seq_len``)."""
        positions = torch.linspace(0, max(0, len(self) - 2), batch_size * n_batches).long()
        return [self.packed_at(part, seq_len) for part in positions.split(batch_size)]


def _fields(rows: PackedRows) -> tuple[Tensor, ...]:
    return rows.inputs, rows.targets, rows.counted, rows.starts, rows.n_real
