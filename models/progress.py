"""Progress bars (tqdm) for training, long prefills and the demo's profiling.

A bar is drawn only when its stream (stderr by default) is a terminal; log lines go above it
(``tqdm.write``), and are the only output when the stream is a file or a pipe.
"""

from __future__ import annotations

import sys
from typing import TextIO

from tqdm import tqdm


class Progress:
    """A tqdm bar on ``stream`` (stderr), drawn only on a terminal, with log lines printed above it.

    ``label`` prefixes the bar (as its description) and each log line; ``enabled=False`` prints nothing at
    all. ``leave=False`` clears the bar when it closes (for a passing step such as a prefill).
    """

    def __init__(
        self,
        total: int,
        label: str = "",
        stream: TextIO | None = None,
        enabled: bool = True,
        *,
        unit: str = "step",
        leave: bool = True,
    ) -> None:
        self.label, self.enabled = label, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.bar = tqdm(
            total=total,
            desc=label.strip() or None,
            unit=unit,
            file=self.stream,
            disable=None if enabled else True,  # None: tqdm draws only on a terminal
            leave=leave,
            dynamic_ncols=True,
        )

    @property
    def live(self) -> bool:
        """Whether the bar is drawn."""
        return not self.bar.disable

    def update(self, done: int, text: str = "") -> None:
        """Set the bar to ``done`` of ``total``, with ``text`` (the loss, a speed) after it."""
        if self.bar.disable:
            return
        if text:
            self.bar.set_postfix_str(text, refresh=False)
        self.bar.update(done - self.bar.n)

    def log(self, line: str) -> None:
        """Print a line above the bar."""
        if self.enabled:
            tqdm.write(f"{self.label}{line}", file=self.stream)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
