"""Recurrent cells: each module holds one cell's equations as plain autograd (the reference) and
the fused per-step forward and backward that the engine in `lmtrain.recurrence` calls."""
