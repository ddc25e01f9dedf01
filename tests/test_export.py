"""`lmtrain export --format torch-lstm`: the file loads into stock nn.Embedding, nn.LSTM and
nn.Linear (the docs' example, run here) and gives our model's logits; what nn.LSTM cannot express
is refused in one line; --out is written whole or not at all."""

import re
from pathlib import Path

import torch

from helpers import TINY_WORD, assert_one_error, cli, ok, train_small_run
from lmtrain.model import load_run

DOCS = Path(__file__).resolve().parent.parent / "docs" / "usage.md"


def docs_example() -> str:
    """The loading example of docs/usage.md (the python block after 'Loading it without lmtrain')."""
    text = DOCS.read_text()
    block = re.search(r"Loading it without lmtrain.*?```python\n(.*?)```", text, re.S)
    assert block, "docs/usage.md lost its torch-lstm loading example"
    return block.group(1)


def test_stock_modules_load_it_and_give_our_logits(tmp_path):
    _, run = train_small_run(tmp_path, [*TINY_WORD, "model.layers=2", "train.max_steps=6", "train.epochs=1"])
    out = tmp_path / "lstm.pt"
    ok(cli("export", run, "--format", "torch-lstm", "--out", out))
    namespace: dict = {"PATH": str(out)}
    exec(docs_example(), namespace)  # builds embedding, lstm, decoder from the file
    tokens = torch.randint(0, namespace["embedding"].num_embeddings, (9, 3), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        output, _ = namespace["lstm"](namespace["embedding"](tokens))
        stock = namespace["decoder"](output)
        loaded = load_run(run, torch.device("cpu"))
        ours, _ = loaded.model.eval()(tokens, loaded.model.init_state(3))
    assert (stock - ours).abs().max().item() <= 1e-5


def test_other_cells_and_an_existing_out_are_refused(tmp_path):
    _, run = train_small_run(tmp_path, [*TINY_WORD, "model.cell=gru", "train.max_steps=3", "train.epochs=1"])
    out = tmp_path / "gru.pt"
    assert "gru" in assert_one_error(cli("export", run, "--format", "torch-lstm", "--out", out), "lstm stack")
    assert not out.exists() and not list(tmp_path.glob(".gru.pt.*"))
    out.write_bytes(b"keep me")
    assert_one_error(cli("export", run, "--out", out), "exists")
    assert_one_error(cli("export", run, "--format", "onnx2", "--out", tmp_path / "x"), "--format")
    assert out.read_bytes() == b"keep me"
