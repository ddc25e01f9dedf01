"""Fast paths for whole sequences, behind the small interface the engine expects of
`cell.sequence_kernel`: `supports(x, state, w_ih, w_hh, b_ih, b_hh, extra) -> bool` and
`run(x, state, w_ih, w_hh, b_ih, b_hh, extra) -> (y, final state)`.

Each kernel computes exactly what the generic engine (lmtrain.recurrence.Recurrence) computes
with the cell's per-step functions; the tests hold the two against each other. Setting the
environment variable LMTRAIN_KERNELS=0 turns every kernel off, leaving the generic engine.
"""

import os


def kernels_enabled() -> bool:
    return os.environ.get("LMTRAIN_KERNELS", "1") != "0"
