"""SIGINT and SIGTERM: before training, stop at once; during training, stop at the next step
boundary with a checkpoint.

    with InterruptSignals() as early:   # reading the corpus, training the tokenizer, encoding
        prepare(...)                     # either signal raises KeyboardInterrupt here
    ... except KeyboardInterrupt: exit with early.exit_code()

    with StopSignals() as signals:
        train(..., stop_requested=signals.received)   # the loop asks between steps

The first SIGINT (Ctrl-C) or SIGTERM only records itself; the loop finishes the step it is in,
writes last.pt and returns. A second one, for a user who will not wait, raises KeyboardInterrupt
at once: checkpoints are written to a temporary file and renamed (lmtrain.atomic), so even then
last.pt is the last whole checkpoint. The exit code is 128 + the signal's number, as a shell
reports a process killed by it: 130 for SIGINT, 143 for SIGTERM.
"""

from __future__ import annotations

import os
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


class InterruptSignals:
    """Before training, SIGTERM does what SIGINT does: raise KeyboardInterrupt in the main thread,
    so that the same cleanup runs (temporary files removed by lmtrain.atomic, the encoding pool
    ended) and the command exits with 128 + the signal's number. Without it SIGTERM killed the
    process outright, mid-write.

    Worker processes forked inside the block inherit the handler; there a signal (the pool being
    ended) takes its default action, as it would have without the block."""

    def __init__(self):
        self.signum: int | None = None
        self.pid = os.getpid()
        self.previous: dict[int, object] = {}

    def install(self) -> InterruptSignals:
        """Install the handlers (main thread only; elsewhere nothing changes)."""
        if threading.current_thread() is threading.main_thread():
            for signum in HANDLED:
                self.previous[signum] = signal.signal(signum, self.handle)
        return self

    def restore(self) -> None:
        """Put the previous handlers back."""
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous.clear()

    def __enter__(self) -> InterruptSignals:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()

    def handle(self, signum: int, frame) -> None:
        if os.getpid() != self.pid:  # a forked worker: die of the signal, as without the handler
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = self.signum or signum
        raise KeyboardInterrupt

    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "SIGINT"

    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGINT)
