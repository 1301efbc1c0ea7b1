"""The embedded default corpus, the byte tokenizer, and batches.

The default corpus is the English help text every Python installation carries (``pydoc_data.topics``,
about 465 KB: the language reference behind ``help("if")``), so training needs no download. Any text
file can replace it. Tokens are bytes (vocabulary 256), which needs no tokenizer files either.
"""

from __future__ import annotations

import codecs
from pathlib import Path

import torch
from torch import Tensor

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


def random_batch(data: Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``batch_size`` random windows: inputs ``[B, T]`` and next-token targets ``[B, T]`` (int64)."""
    starts = torch.randint(0, len(data) - seq_len, (batch_size,), generator=generator)
    windows = torch.stack([data[s : s + seq_len + 1] for s in starts.tolist()]).long()  # (B, T + 1)
    return windows[:, :-1], windows[:, 1:]


def fixed_batches(data: Tensor, batch_size: int, seq_len: int, n_batches: int) -> list[tuple[Tensor, Tensor]]:
    """``n_batches`` batches of windows spread evenly over ``data`` (the same every time, for validation)."""
    n = batch_size * n_batches
    starts = torch.linspace(0, len(data) - seq_len - 1, n).long().tolist()
    windows = torch.stack([data[s : s + seq_len + 1] for s in starts]).long()  # (n, T + 1)
    return [(w[:, :-1], w[:, 1:]) for w in windows.split(batch_size)]
