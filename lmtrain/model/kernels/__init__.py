"""Fast paths for whole sequences, behind the small interface the engine expects of
`cell.sequence_kernel`: `supports(x, state, w_ih, w_hh, b_ih, b_hh, extra, compute_dtype) -> bool` and
`run(x, state, w_ih, w_hh, b_ih, b_hh, extra, compute_dtype) -> (y, final state)`, where compute_dtype is None or
torch.bfloat16 (mixed precision's GEMM operands, lmtrain.model.kernels.mixed).

Each kernel computes exactly what the generic engine (lmtrain.model.recurrence.Recurrence) computes
with the cell's per-step functions; the tests hold the two against each other. Which one runs is
decided in one place, lmtrain.model.kernels.dispatch, which reads every LMTRAIN_* switch
(LMTRAIN_KERNELS=0 turns every kernel off, leaving the generic engine).
"""

from lmtrain.model.kernels.dispatch import on


def kernels_enabled() -> bool:
    return on("LMTRAIN_KERNELS")
