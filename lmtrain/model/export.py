"""A trained LSTM stack as weights that stock PyTorch modules load (`lmtrain export --format
torch-lstm`): nn.Embedding → nn.LSTM → nn.Linear, no lmtrain needed to run them.

Our LSTM's gate order is torch.nn.LSTM's (i, f, g, o) and our one bias is the sum of its two, so
the conversion is a renaming: layers.k.w_ih → lstm.weight_ih_l{k}, w_hh → weight_hh_l{k},
b_ih → bias_ih_l{k}, and bias_hh_l{k} = 0. A tied decoder's weight is the embedding's, written out.
The file (torch.save of a dict) holds "state_dict" (keys embedding.*, lstm.*, decoder.*) and
"shapes" (the constructor arguments: vocab_size, embedding_size, hidden_size, num_layers).

What nn.LSTM cannot express is refused, naming it: another cell in any layer, layers of
different sizes (nn.LSTM has one hidden_size), attention over past states (model.attention_window),
or zoneout (whose evaluation mixes each step's state with the last one). Dropout, weight drop and the
other regularisers act only in training and are not part of the weights.
"""

from __future__ import annotations

from typing import Any

import torch

from lmtrain.config import Config
from lmtrain.errors import LmtrainError


def torch_lstm_payload(config: Config, weights: dict[str, torch.Tensor]) -> dict[str, Any]:
    """config and the model's state_dict -> {"state_dict": ..., "shapes": ...} for stock modules."""
    m = config.model
    others = sorted({name for name in m.cells if name != "lstm"})
    if others:
        raise LmtrainError(f"--format torch-lstm needs an lstm stack; this run has {', '.join(others)} layers "
                           "(torch.nn.LSTM has no such cell)")
    if m.stack != "layers":
        raise LmtrainError(f"--format torch-lstm needs a stack of lstm layers; this run's model.stack is {m.stack} "
                           "(torch.nn.LSTM has no such stack)")
    if m.attention_window:
        raise LmtrainError(f"--format torch-lstm needs a plain lstm stack; this run has attention over past states "
                           f"(model.attention_window = {m.attention_window}), which stock PyTorch modules do not have")
    zoned = [key for key in ("zoneout_hidden", "zoneout_cell") if getattr(m, key)]
    if zoned:
        raise LmtrainError(f"--format torch-lstm cannot carry zoneout (model.{zoned[0]} = {getattr(m, zoned[0])}): "
                           "torch.nn.LSTM would not mix each step's state with the last one as its evaluation does")
    sizes = set(m.layer_sizes)
    if len(sizes) != 1:
        raise LmtrainError(f"--format torch-lstm needs one hidden size for every layer (torch.nn.LSTM has one); "
                           f"this run's layers are {', '.join(map(str, m.layer_sizes))}")
    state: dict[str, torch.Tensor] = {"embedding.weight": weights["embedding.weight"].clone()}
    for k in range(m.layers):
        state[f"lstm.weight_ih_l{k}"] = weights[f"layers.{k}.w_ih"].clone()
        state[f"lstm.weight_hh_l{k}"] = weights[f"layers.{k}.w_hh"].clone()
        state[f"lstm.bias_ih_l{k}"] = weights[f"layers.{k}.b_ih"].clone()
        state[f"lstm.bias_hh_l{k}"] = torch.zeros_like(weights[f"layers.{k}.b_ih"])
    state["decoder.weight"] = weights.get("decoder.weight", weights["embedding.weight"]).clone()
    state["decoder.bias"] = weights["decoder.bias"].clone()
    shapes = {"vocab_size": state["embedding.weight"].size(0), "embedding_size": m.embedding_size,
              "hidden_size": sizes.pop(), "num_layers": m.layers}
    return {"state_dict": state, "shapes": shapes}
