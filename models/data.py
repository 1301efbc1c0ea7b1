"""The embedded default corpus, the byte tokenizer, and batches.

The default corpus is the English help text every Python installation carries (``pydoc_data.topics``,
about 465 KB: the language reference behind ``help("if")``), so training needs no download. Any text
file can replace it. Tokens are bytes (vocabulary 256), which needs no tokenizer files either.

A text can also be read as documents (``documents``) and packed into fixed-length rows that no document crosses
(``pack_documents``), for training with ``cu_seqlens``.
"""

from __future__ import annotations

import codecs
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from models.config import ConfigError

BYTE_VOCAB = 256


def default_corpus() -> bytes:
    """The pydoc topics, in a fixed (sorted) order, as UTF-8 bytes."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name].strip() for name in sorted(topics)).encode("utf-8")


def load_corpus(path: str | Path | None = None) -> bytes:
    """The bytes of the text file at ``path``, or the default corpus."""
    if path is None:
        return default_corpus()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    return path.read_bytes()


def encode(text: str) -> Tensor:
    """UTF-8 bytes of ``text`` as int64 token ids ``[T]``."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def decode(tokens: Tensor | list[int]) -> str:
    """Token ids back to text; invalid UTF-8 (and ids >= 256) become U+FFFD."""
    ids = tokens.tolist() if isinstance(tokens, Tensor) else list(tokens)
    return b"".join(bytes([i]) if 0 <= i < BYTE_VOCAB else b"\xef\xbf\xbd" for i in ids).decode("utf-8", "replace")


class StreamDecoder:
    """Decodes tokens as they are generated; a multi-byte character appears once complete."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def __call__(self, token: int) -> str:
        return self._decoder.decode(bytes([token]) if 0 <= token < BYTE_VOCAB else b"\xef\xbf\xbd")

    def flush(self) -> str:
        """What is left: an incomplete character at the end becomes U+FFFD."""
        return self._decoder.decode(b"", final=True)


def split(data: bytes, val_fraction: float, seq_len: int) -> tuple[Tensor, Tensor]:
    """``(train, val)`` uint8 tensors: the last ``val_fraction`` of the bytes is held out."""
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    n_val = int(len(tokens) * val_fraction)
    if n_val < seq_len + 1 or len(tokens) - n_val < seq_len + 1:
        raise ValueError(
            f"the corpus ({len(tokens)} bytes) is too small for seq_len={seq_len} with val_fraction={val_fraction}: "
            f"both parts need more than seq_len bytes"
        )
    return tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val :]


def random_starts(data: Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> Tensor:
    """The starts of ``batch_size`` random windows of ``seq_len + 1`` tokens of ``data``."""
    return torch.randint(0, len(data) - seq_len, (batch_size,), generator=generator)


def windows(data: Tensor, starts: Tensor, seq_len: int) -> tuple[Tensor, Tensor]:
    """The windows at ``starts``: inputs ``[B, T]`` and next-token targets ``[B, T]`` (int64)."""
    rows = torch.stack([data[s : s + seq_len + 1] for s in starts.tolist()]).long()  # (B, T + 1)
    return rows[:, :-1], rows[:, 1:]


def random_batch(data: Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``batch_size`` random windows: inputs ``[B, T]`` and next-token targets ``[B, T]`` (int64)."""
    return windows(data, random_starts(data, batch_size, seq_len, generator), seq_len)


def fixed_batches(data: Tensor, batch_size: int, seq_len: int, n_batches: int) -> list[tuple[Tensor, Tensor]]:
    """``n_batches`` batches of windows spread evenly over ``data`` (the same every time, for validation)."""
    n = batch_size * n_batches
    starts = torch.linspace(0, len(data) - seq_len - 1, n).long().tolist()
    windows = torch.stack([data[s : s + seq_len + 1] for s in starts]).long()  # (n, T + 1)
    return [(w[:, :-1], w[:, 1:]) for w in windows.split(batch_size)]


# Documents and packed rows ------------------------------------------------------------------------------

DOCUMENT_FORMATS = ("separator", "lines", "jsonl")
IGNORE = -100  # the target of a position that is not trained on (``F.cross_entropy``'s default ignore_index)


class DocumentError(ConfigError):
    """The training data cannot be read as documents (a bad JSONL line, too few documents). A ``ConfigError``,
    so that ``seqmixers train`` reports it in one line."""


def documents(data: bytes, how: str, *, separator: str = "\n\n", field: str = "text") -> list[bytes]:
    """The documents of ``data``, in order, as UTF-8 bytes; empty documents are dropped.

    ``how``:
        ``"separator"``: the pieces between occurrences of ``separator`` (the separator belongs to neither).
        ``"lines"``: one document per line (``\\n``, ``\\r\\n`` or ``\\r``; the line ending is not part of it).
        ``"jsonl"``: one JSON object per line, whose string ``field`` is the document; blank lines are skipped.
            A line that is not such an object raises ``DocumentError`` naming its number and what was expected.
    """
    if how not in DOCUMENT_FORMATS:
        raise ValueError(f"how must be one of {list(DOCUMENT_FORMATS)}, got {how!r}")
    if how == "separator":
        if not isinstance(separator, str) or not separator:
            raise ValueError(f"separator must be a non-empty string, got {separator!r}")
        return [doc for doc in data.split(separator.encode("utf-8")) if doc]
    if how == "lines":
        return [line for line in data.splitlines() if line]
    docs = []
    for number, line in enumerate(data.splitlines(), start=1):
        if line.strip():
            text = jsonl_text(line, field, f"JSONL line {number}")
            if text:
                docs.append(text.encode("utf-8"))
    return docs


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


def tokenize_documents(docs: list[bytes]) -> list[Tensor]:
    """Byte tokens of each document: uint8 tensors ``[n_i]``."""
    return [torch.frombuffer(bytearray(doc), dtype=torch.uint8) for doc in docs]


def split_documents(docs: list, val_fraction: float) -> tuple[list, list]:
    """``(train, val)``: the last ``val_fraction`` of the documents (at least one) is held out for validation."""
    n_val = max(1, int(len(docs) * val_fraction))
    if len(docs) - n_val < 1:
        raise DocumentError(
            f"the data holds {len(docs)} document(s) of 2 or more tokens; training and validation need at least "
            f"one each: give more documents"
        )
    return docs[: len(docs) - n_val], docs[len(docs) - n_val :]


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


def random_packed_batch(rows: PackedRows, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """``batch_size`` random rows (with replacement) as one packed row: ``(x [1, B*L], y [1, B*L], cu_seqlens)``."""
    return rows.batch(random_rows(rows, batch_size, generator))


def random_rows(rows: PackedRows, batch_size: int, generator: torch.Generator) -> Tensor:
    """The indices of ``batch_size`` random rows (with replacement)."""
    return torch.randint(0, len(rows), (batch_size,), generator=generator)


def fixed_packed_batches(rows: PackedRows, batch_size: int, n_batches: int) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Up to ``n_batches`` batches of rows spread evenly over ``rows``, each ``(x [1, B*L], y [1, B*L],
    cu_seqlens)`` (the same every time, for validation); all the rows, each once, if there are fewer."""
    n = min(len(rows), batch_size * n_batches)
    picked = torch.linspace(0, len(rows) - 1, n).round().long() if n > 1 else torch.zeros(n, dtype=torch.long)
    return [rows.batch(part) for part in picked.split(batch_size)]
