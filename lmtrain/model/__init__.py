"""Tokens -> logits with explicit recurrent state: the language model (language_model), the one
recurrence engine (recurrence), the cells (cells/), their kernels (kernels/), and a trained model
as saved on disk (saved, payload).

This is the stage's face: other stages import from `lmtrain.model` only."""

from lmtrain.model.cells import CELLS, get_cell
from lmtrain.model.kernels import build, dispatch, selfcheck, step_ops
from lmtrain.model.kernels.step_ops import WEIGHT_PRECISIONS
from lmtrain.model.kernels.build import cpu_ops
from lmtrain.model.kernels.dispatch import Choice, explain, is_lstm
from lmtrain.model.kernels.cross_entropy import cross_entropy
from lmtrain.model.kernels.fused import held_scratch
from lmtrain.model.language_model import LanguageModel, State, count_parameters, detach_state
from lmtrain.model.layer import RecurrentLayer, is_standard, layer_class, stack_forward
from lmtrain.model.recurrence import run_layer
from lmtrain.model.payload import (
    Checked,
    Fields,
    WEIGHT_DTYPE,
    check_floats,
    check_payload,
    check_state_dict,
    check_weight_dict,
    model_shapes,
    parameter_keys,
    show,
    state_widths,
)
from lmtrain.model.saved import LoadedRun, Saved, build_saved, load_run, read_saved
from lmtrain.model import hub
from lmtrain.model.export import torch_lstm_payload
from lmtrain.model.onnx_step import onnx_bytes

__all__ = [
    "CELLS", "Checked", "Fields", "LanguageModel", "RecurrentLayer", "State", "WEIGHT_DTYPE", "build",
    "check_floats", "check_payload", "check_state_dict", "check_weight_dict", "count_parameters", "cpu_ops",
    "cross_entropy", "detach_state", "dispatch", "get_cell", "held_scratch", "load_run", "LoadedRun", "Saved",
    "build_saved", "read_saved", "run_layer", "selfcheck", "show", "step_ops", "WEIGHT_PRECISIONS",
    "Choice", "explain", "is_lstm", "is_standard", "layer_class", "stack_forward", "model_shapes", "parameter_keys", "state_widths", "torch_lstm_payload", "hub", "onnx_bytes"
]
