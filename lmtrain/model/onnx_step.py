"""A trained model's one-token step as standard ONNX operators (`lmtrain export --format onnx`):
it runs in any ONNX runtime, without lmtrain or our kernels.

    inputs   tokens (B,) int64, then each layer's state tensors (B, H_l) float32, named
             state_L_NAME (NAME from the cell's STATE: h, c, ...)
    outputs  logits (B, V) float32, then the new states, named next_L_NAME

The graph is traced from plain torch operations: the embedding row, per layer x W_ih^T + b_ih
and h W_hh^T (+ b_hh), the cell's forward_step (generated from its equations, so every cell
exports), and the decoder. Batch is a dynamic axis. Start from zeros (the model's init_state)
and feed each step's new states back in.
"""

from __future__ import annotations

import io

import torch
from torch import Tensor, nn

from lmtrain.errors import LmtrainError
from lmtrain.model.language_model import LanguageModel
from lmtrain.model.layer import is_standard

OPSET = 17


class StepModule(nn.Module):
    """LanguageModel -> forward(tokens (B,), *states) = (logits (B, V), *new states), plain torch."""

    def __init__(self, model: LanguageModel):
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor, *states: Tensor) -> tuple[Tensor, ...]:
        x = self.model.embedding(tokens)
        new: list[Tensor] = []
        k = 0
        for layer in self.model.layers:
            n = len(layer.cell.STATE)
            state, k = tuple(states[k:k + n]), k + n
            xg = x @ layer.w_ih.t() + layer.b_ih
            hg = state[0] @ layer.w_hh.t()
            if layer.b_hh is not None:
                hg = hg + layer.b_hh
            state, _ = layer.cell.forward_step(xg, hg, state, tuple(layer.extra))
            new.extend(state)
            x = state[0]
        return (self.model.decoder(x), *new)


def state_names(model: LanguageModel, prefix: str) -> list[str]:
    return [f"{prefix}_{k}_{name}" for k, layer in enumerate(model.layers) for name in layer.cell.STATE]


def onnx_bytes(model: LanguageModel) -> bytes:
    """The model's step as an ONNX file's bytes (the `onnx` package must be installed)."""
    import importlib.util

    zoned = [key for key in ("zoneout_hidden", "zoneout_cell") if getattr(model.config, key)]
    if zoned:  # its evaluation mixes each step's state with the last one, which the step graph does not
        raise LmtrainError(f"the onnx format does not cover zoneout (model.{zoned[0]}) yet: export it as safetensors")
    if importlib.util.find_spec("onnx") is None:  # torch's exporter needs it
        raise LmtrainError("the onnx format needs the onnx package: pip install 'lmtrain[export]'")
    own = sorted({layer.cell.__name__.rsplit(".", 1)[-1] for layer in model.layers if not is_standard(layer)})
    if own:
        raise LmtrainError(f"the onnx format does not cover the {', '.join(own)} cell yet: export it as safetensors")
    if model.attention is not None:
        raise LmtrainError("the onnx format does not cover the attention over past states (model.attention_window) yet: "
                           "export it as safetensors")
    model = model.float().eval()
    zeros = [s for layer_state in model.init_state(2) for s in layer_state]
    tokens = torch.zeros(2, dtype=torch.long)
    inputs, outputs = ["tokens", *state_names(model, "state")], ["logits", *state_names(model, "next")]
    buffer = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(StepModule(model), (tokens, *zeros), buffer, input_names=inputs, output_names=outputs,
                          dynamic_axes={name: {0: "batch"} for name in inputs + outputs}, opset_version=OPSET,
                          dynamo=False)
    return buffer.getvalue()
