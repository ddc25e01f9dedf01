"""SIGINT and SIGTERM during training: stop at the next step boundary with a checkpoint.

    with StopSignals() as signals:
        train(..., stop_requested=signals.received)   # the loop asks between steps

The first SIGINT (Ctrl-C) or SIGTERM only records itself; the loop finishes the step it is in,
writes last.pt and returns. A second one, for a user who will not wait, raises KeyboardInterrupt
at once: checkpoints are written to a temporary file and renamed (lmtrain.atomic), so even then
last.pt is the last whole checkpoint. The exit code is 128 + the signal's number, as a shell
reports a process killed by it: 130 for SIGINT, 143 for SIGTERM.
"""

from __future__ import annotations

import signal
import threading

HANDLED = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """Install the handlers on entry (main thread only; elsewhere nothing changes), restore the
    previous ones on exit."""

    def __init__(self):
        self.signum: int | None = None
        self.previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in HANDLED:
                self.previous[signum] = signal.signal(signum, self.handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous.clear()

    def handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt  # the second signal: stop now
        self.signum = signum

    def received(self) -> int | None:
        """The first signal's number, or None."""
        return self.signum

    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGINT)
