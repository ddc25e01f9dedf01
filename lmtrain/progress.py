"""The only module that writes training progress to the terminal.

`train` calls the methods below (close() once, however training ends), `prepare` bytes_bar (a
bar over the bytes of a text being read); `QuietProgress` is for library use and tests.
"""

from __future__ import annotations

import math
import sys

from tqdm import tqdm


class QuietProgress:
    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        pass

    def step(self, loss: float, tokens_per_s: float, lr: float) -> None:
        pass

    def end_epoch(self, record: dict) -> None:
        pass

    def note(self, message: str) -> None:
        pass

    def close(self) -> None:
        pass

    def bytes_bar(self, total: int, desc: str) -> tqdm:
        """A context manager with update(n_bytes); here one that shows nothing."""
        return tqdm(total=total, disable=True)


class TerminalProgress(QuietProgress):
    """A tqdm bar per epoch (loss, perplexity, tokens/s, ETA) and one summary line after it."""

    def __init__(self, stream=None):
        self.stream = stream if stream is not None else sys.stderr
        self.bar: tqdm | None = None

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        self.bar = tqdm(total=steps, desc=f"epoch {epoch}/{epochs}", unit="step", file=self.stream,
                        dynamic_ncols=True, leave=False, mininterval=0.5)

    def step(self, loss: float, tokens_per_s: float, lr: float) -> None:
        self.bar.set_postfix_str(f"loss {loss:.3f} ppl {math.exp(min(loss, 50)):.1f} {tokens_per_s:,.0f} tok/s lr {lr:.3g}", refresh=False)
        self.bar.update()

    def end_epoch(self, record: dict) -> None:
        if self.bar is not None:
            self.bar.close()
        print(
            f"epoch {record['epoch']:3d} | step {record['step']:6d} | lr {record['lr']:.3g} | "
            f"train ppl {record['train_ppl']:8.2f} | valid ppl {record['valid_ppl']:8.2f} | "
            f"{record['tokens_per_s']:,.0f} tok/s | {record['elapsed_s']:.0f} s",
            file=self.stream,
            flush=True,
        )

    def note(self, message: str) -> None:
        print(message, file=self.stream, flush=True)

    def close(self) -> None:
        """End an unfinished bar (training stopped mid-epoch), so what follows starts a line."""
        if self.bar is not None and not self.bar.disable:
            self.bar.close()
            self.bar = None

    def bytes_bar(self, total: int, desc: str) -> tqdm:
        """Bytes read so far, in MB/s; nothing when the stream is not a terminal (a log file, tests)."""
        shown = hasattr(self.stream, "isatty") and self.stream.isatty() and total > 0
        return tqdm(total=total, desc=desc, unit="B", unit_scale=True, file=self.stream, dynamic_ncols=True,
                    leave=False, mininterval=0.5, disable=not shown)
