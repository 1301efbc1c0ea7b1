"""Trains a byte-level BPE tokenizer for ``models.training.tokenizers.BPETokenizer.train`` in a process of its own.

The ``tokenizers`` library trains in Rust without returning to Python, so a signal handler of the process that
calls it never runs until it is done (minutes, on some data). Run in a child process, the training can be
stopped at any moment: the parent kills it. Run as a script (``python _bpe_worker.py PARENT_PID``), it imports
only the standard library and ``tokenizers``, so it starts in a fraction of a second.

stdin: one JSON line of options (``vocab_size``, ``min_frequency``, ``show_progress``), then the texts, each as
a 4-byte little-endian length and that many bytes of UTF-8, then a length of 0. stdout: the trained tokenizer's
JSON. It ignores SIGINT (a Ctrl-C reaches the whole process group; the parent decides) and exits when the parent
goes away, or when its input ends before the length 0 (a parent that stopped feeding it).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import BinaryIO


def texts(stream: BinaryIO) -> Iterator[str]:
    """The texts of the framed input, up to the length 0 that ends it."""
    while True:
        head = stream.read(4)
        if len(head) < 4:
            os._exit(1)  # the parent stopped before the end: nothing to train on
        n = int.from_bytes(head, "little")
        if n == 0:
            return
        yield stream.read(n).decode("utf-8")


def exit_when_orphaned(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=exit_when_orphaned, args=(int(sys.argv[1]),), daemon=True).start()
    # A script's folder comes first on sys.path, and this one holds models/training/tokenizers.py: without it
    # there, ``import tokenizers`` finds the library.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    import tokenizers as tk

    stdin = sys.stdin.buffer
    options = json.loads(stdin.readline())
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=options["vocab_size"],
        min_frequency=options["min_frequency"],
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=options["show_progress"],  # the library's bars, on stderr; drawn only on a terminal
    )
    tok.train_from_iterator(texts(stdin), trainer=trainer)
    sys.stdout.write(tok.to_str())
    sys.stdout.flush()


if __name__ == "__main__":
    main()
