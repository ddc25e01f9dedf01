"""TensorBoard scalars beside metrics.jsonl (train.tensorboard = true).

metrics.jsonl stays the record; `MetricsLog` is its file with every record written to it also
sent to TensorBoard, so the two hold the same numbers by construction: each numeric field of a
record becomes the scalar `KIND/FIELD` (e.g. `train/loss`, `epoch/valid_ppl`) at the
record's training step. The event files go to RUN/tensorboard/ (`tensorboard --logdir RUN`);
a resumed run adds a new event file there, which TensorBoard reads as one run, the events its
predecessor wrote after the checkpoint hidden; `--force` removes the event files with the run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO

from lmtrain.errors import LmtrainError

SUBDIRECTORY = "tensorboard"
NOT_SCALARS = ("step", "epoch")  # the axis, and the epoch number itself


def writer_class():
    """torch's SummaryWriter, or a one-line error when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise LmtrainError("train.tensorboard = true needs the tensorboard package: pip install 'lmtrain[tensorboard]'") from e
    return SummaryWriter


class MetricsLog:
    """metrics.jsonl's open file (every attribute passes through), whose writes also go to
    TensorBoard, one record per line."""

    def __init__(self, file: IO[str], run_dir: Path, resumed_at: int | None = None):
        self._file = file
        # a resumed run cuts metrics.jsonl back to its checkpoint and writes on from there:
        # TensorBoard hides the earlier files' events from the checkpoint's step on (purge_step),
        # so it shows the same records as metrics.jsonl
        self._writer = writer_class()(log_dir=str(run_dir / SUBDIRECTORY), purge_step=resumed_at)
        if resumed_at is not None:  # the records metrics.jsonl keeps at that step, hidden with the rest: again
            for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
                if json.loads(line).get("step") == resumed_at:
                    self._scalars(line)

    def write(self, text: str) -> int:
        written = self._file.write(text)
        for line in text.splitlines():
            self._scalars(line)
        return written

    def _scalars(self, line: str) -> None:
        record = json.loads(line)
        for field, value in record.items():
            if field not in NOT_SCALARS and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(f"{record.get('kind', 'record')}/{field}", value, record["step"])

    def flush(self) -> None:
        self._file.flush()
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
        self._file.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getattr__(self, name: str):
        return getattr(self._file, name)
