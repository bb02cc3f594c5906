"""Stopping a run cleanly: SIGINT (Ctrl-C) or SIGTERM (a scheduler's stop, `timeout`) sets a flag;
the loop finishes its step, writes a checkpoint and stops, so a rerun resumes with nothing lost.
A second signal interrupts at once."""

from __future__ import annotations

import signal
import threading


class TrainingStopped(KeyboardInterrupt):
    """The loop stopped on a signal after writing its checkpoint."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class StopRequest:
    """While entered (in the main thread), SIGINT and SIGTERM set ``signum`` instead of killing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # a second signal: stop now
            self.__exit__()
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
