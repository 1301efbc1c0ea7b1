"""Stopping a run on SIGINT or SIGTERM: after the step under way, agreed by every rank, so that what is saved is a
whole step (``StopSignals``); ``Interrupted`` says where the run stopped and what it saved."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

from models.training.parallel import World, all_sum


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped a run after ``step`` whole steps, whose model is saved in ``checkpoint``."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.signal_name = signal.Signals(signum).name
        saved = f"; saved {checkpoint}" if checkpoint is not None else ""
        super().__init__(f"interrupted by {self.signal_name} after step {step}{saved}")


class StopSignals:
    """While it is entered (in the main thread), the first SIGINT or SIGTERM only asks the loop to stop after
    the current step, so that what is saved is a whole step; a second one interrupts at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopped without saving")
        self.signum = signum  # no printing here: the handler may run in the middle of a write to stderr

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def requested(self, world: World) -> int | None:
        """The signal that asks the run to stop, agreed by every rank (a rank that stops alone would hang the
        others' next collective)."""
        if world.size == 1:
            return self.signum
        agreed = all_sum(self.signum or 0, world)
        return self.signum or (int(agreed) if agreed else None)

    def release(self) -> None:
        """Restore the handlers from before (a signal from now on acts as it did before training)."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def __exit__(self, *exc: object) -> None:
        self.release()
