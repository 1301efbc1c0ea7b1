"""Tokenizers: one protocol (``Tokenizer``) for the byte tokenizer and the byte-level BPE tokenizer, streaming
decode included (``Tokenizer.stream``).

``ByteTokenizer`` needs no file: its ids are the UTF-8 bytes (vocabulary 256). ``BPETokenizer`` (the ``tokenizers``
library) is trained on the training data in a child process (``_bpe_worker.py``) that a signal can stop, and saved
as ``tokenizer.json`` beside a run's checkpoints; ``load_tokenizer`` gives the one saved in a folder, else bytes.
See docs/training-data.md.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

from torch import Tensor

BYTE_VOCAB = 256
BPE_PIECE_CHARS = 1 << 10  # the most characters BPE training sees at once (see BPETokenizer.train)
TOKENIZER_FILE = "tokenizer.json"


@runtime_checkable
class TextStream(Protocol):
    """Decodes token ids as they are generated: ``stream(token)`` gives the text that token completes ("" while a
    character is still incomplete), ``flush()`` what is left at the end."""

    def __call__(self, token: int) -> str: ...

    def flush(self) -> str: ...


@runtime_checkable
class Tokenizer(Protocol):
    """What training and generation need of a tokenizer. ``fingerprint`` changes whenever the ids it gives do;
    ``encode_batch`` gives what ``encode`` gives for each text (faster); ``stream()`` a fresh ``TextStream``."""

    name: str

    @property
    def vocab_size(self) -> int: ...

    @property
    def fingerprint(self) -> str: ...

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def decode(self, ids: Iterable[int] | Tensor) -> str: ...

    def stream(self) -> TextStream: ...

    def save(self, directory: str | Path) -> None: ...


_REPLACEMENT = "\ufffd".encode()  # U+FFFD, what an id that is not a byte decodes to


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocabulary 256). Needs no file. Invalid UTF-8 (and ids >= 256) decode to U+FFFD."""

    name = "bytes"
    vocab_size = BYTE_VOCAB
    fingerprint = "bytes"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def decode(self, ids: Iterable[int] | Tensor) -> str:
        ids = ids.tolist() if isinstance(ids, Tensor) else ids
        return b"".join(_byte(i) for i in ids).decode("utf-8", "replace")

    def stream(self) -> TextStream:
        """An incremental UTF-8 decoder: a multi-byte character appears once its last byte comes."""
        return _ByteStream()

    def save(self, directory: str | Path) -> None:
        """Bytes need no file: removes a ``tokenizer.json`` left there, so that ``load_tokenizer`` gives bytes."""
        (Path(directory) / TOKENIZER_FILE).unlink(missing_ok=True)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ByteTokenizer)

    def __hash__(self) -> int:
        return hash(self.name)

    def __repr__(self) -> str:
        return "ByteTokenizer()"


def _byte(i: int) -> bytes:
    return bytes([i]) if 0 <= i < BYTE_VOCAB else _REPLACEMENT


class _ByteStream:
    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def __call__(self, token: int) -> str:
        return self._decoder.decode(_byte(int(token)))

    def flush(self) -> str:
        """What is left: an incomplete character at the end becomes U+FFFD."""
        return self._decoder.decode(b"", final=True)


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise ImportError(
            "the BPE tokenizer needs the `tokenizers` library: pip install tokenizers "
            "(or pip install 'seqmixers[bpe]'); the byte tokenizer needs nothing"
        ) from None
    return tokenizers


def bounded_pieces(texts: Iterable[str], max_chars: int = BPE_PIECE_CHARS) -> Iterator[str]:
    """``texts`` in pieces of at most ``max_chars`` characters that join to them: each cut just before the last
    space or line end of the piece, where it has one (a word of BPE's pre-tokenizer starts there, so words stay
    whole), else after ``max_chars`` characters (a run without whitespace). Empty texts give nothing."""
    if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 1:
        raise ValueError(f"max_chars must be an int >= 1, got {max_chars!r}")
    for text in texts:
        start = 0
        while len(text) - start > max_chars:
            end = start + max_chars
            cut = max(text.rfind(c, start + 1, end + 1) for c in " \n\t")
            cut = cut if cut > start else end
            yield text[start:cut]
            start = cut
        if start < len(text):
            yield text[start:]


class TokenizerInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the training of a tokenizer (at once: there is nothing to save)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name} while training the BPE tokenizer")


@contextlib.contextmanager
def _stop_at_once() -> Iterator[None]:
    """While entered in the main thread, SIGINT and SIGTERM (unless ignored) raise ``TokenizerInterrupted``,
    whatever handlers were set before (restored on the way out)."""

    def stop(signum: int, frame: object) -> None:
        raise TokenizerInterrupted(signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(signum) is not signal.SIG_IGN:
                previous[signum] = signal.signal(signum, stop)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def _train_in_worker(pieces: Iterable[str], options: dict) -> str:
    """The JSON of a BPE tokenizer trained on ``pieces`` by ``_bpe_worker.py`` in a child process, which
    is killed if anything goes wrong here (a signal, an error reading the texts)."""
    worker = [sys.executable, str(Path(__file__).with_name("_bpe_worker.py")), str(os.getpid())]
    with _stop_at_once(), subprocess.Popen(worker, stdin=subprocess.PIPE, stdout=subprocess.PIPE) as proc:
        try:
            try:
                proc.stdin.write(json.dumps(options).encode("utf-8") + b"\n")
                for piece in pieces:
                    data = piece.encode("utf-8")
                    proc.stdin.write(len(data).to_bytes(4, "little") + data)
                proc.stdin.write(bytes(4))  # the end
                proc.stdin.close()
            except BrokenPipeError:
                pass  # the worker stopped early: its exit code says so
            trained = proc.stdout.read().decode("utf-8")
            code = proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(OSError):
                proc.stdin.close()  # its buffer may hold what a killed worker never read
    if code != 0 or not trained:
        raise RuntimeError(f"training the BPE tokenizer failed: its worker process exited with code {code}")
    return trained


class BPETokenizer:
    """A byte-level BPE tokenizer (GPT-2 style) from the ``tokenizers`` library: every text encodes, and
    ``decode(encode(text)) == text``. Made with ``train`` (on the training data) or ``load``; ``save(dir)`` writes
    ``dir/tokenizer.json``."""

    name = "bpe"

    def __init__(self, tokenizer) -> None:
        self._tok = tokenizer
        self._fingerprint = hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()[:16]

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        *,
        min_frequency: int = 2,
        show_progress: bool = True,
        max_piece_chars: int = BPE_PIECE_CHARS,
    ) -> BPETokenizer:
        """Learn merges from ``texts`` (e.g. ``iter_texts(source)``) up to ``vocab_size`` ids (at least 256: the
        bytes come first); fewer if the text runs out of pairs seen ``min_frequency`` times.

        The texts are fed in pieces of at most ``max_piece_chars`` characters (``bounded_pieces``): a long run
        without whitespace is one "word" to BPE, and its cost grows with the word's length times the merges (a
        1 MB line took minutes), so bounded pieces keep the time proportional to the text. The library trains in
        a child process (``_bpe_worker.py``) fed through a pipe: in the main thread, SIGINT and SIGTERM
        stop it at once, whatever handlers were set (nothing half-trained could be kept), by killing the child
        and raising ``TokenizerInterrupted``. ``show_progress``: the library's progress bars on stderr (drawn
        only on a terminal)."""
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < BYTE_VOCAB:
            raise ValueError(f"vocab_size must be an int >= {BYTE_VOCAB} (the bytes come first), got {vocab_size!r}")
        tk = _tokenizers()
        options = {"vocab_size": vocab_size, "min_frequency": min_frequency, "show_progress": bool(show_progress)}
        trained = _train_in_worker(bounded_pieces(texts, max_piece_chars), options)
        return cls(tk.Tokenizer.from_str(trained))

    @classmethod
    def load(cls, directory: str | Path) -> BPETokenizer:
        path = Path(directory) / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no BPE tokenizer at {str(path)!r}")
        return cls(_tokenizers().Tokenizer.from_file(str(path)))

    def save(self, directory: str | Path) -> None:
        """Write ``directory/tokenizer.json`` (atomically: a temporary file renamed over it)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / TOKENIZER_FILE
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            self._tok.save(str(tmp))
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int] | Tensor) -> str:
        ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        return self._tok.decode(ids, skip_special_tokens=False)

    def stream(self) -> TextStream:
        """Decodes the ids since the last complete text together (a token may hold part of a character)."""
        return _IdsStream(self)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BPETokenizer) and other.fingerprint == self.fingerprint

    def __hash__(self) -> int:
        return hash(self._fingerprint)

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size}, fingerprint={self.fingerprint!r})"


def load_tokenizer(directory: str | Path | None) -> ByteTokenizer | BPETokenizer:
    """The BPE tokenizer saved in ``directory`` (its ``tokenizer.json``), else the byte tokenizer."""
    if directory is not None and (Path(directory) / TOKENIZER_FILE).is_file():
        return BPETokenizer.load(directory)
    return ByteTokenizer()


class _IdsStream:
    """A ``TextStream`` for any tokenizer: the ids since the last complete text are decoded together (for
    byte-level BPE a token may hold part of a character), and text ending in U+FFFD waits for the next token (a
    replacement character that is really in the text comes out at the end, or once text after it is complete)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._pending: list[int] = []

    def __call__(self, token: int) -> str:
        self._pending.append(int(token))
        text = self.tokenizer.decode(self._pending)
        if text.endswith("\ufffd"):
            return ""
        self._pending.clear()
        return text

    def flush(self) -> str:
        text = self.tokenizer.decode(self._pending) if self._pending else ""
        self._pending.clear()
        return text
