"""`lmtrain export`: torch-lstm loads into stock nn.Embedding, nn.LSTM and nn.Linear (the docs'
example, run here) and gives our model's logits; safetensors reads back exactly (and through
lmtrain.load); onnx, run by onnxruntime, gives our logits over 50 steps; what a format cannot
express is refused in one line; --out is written whole or not at all."""

import json
import re
from pathlib import Path

import pytest
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
    assert_one_error(cli("export", run, "--format", "torch-lstm", "--out", out), "exists")
    assert_one_error(cli("export", run, "--format", "onnx2", "--out", tmp_path / "x"), "--format")
    assert out.read_bytes() == b"keep me"


def test_safetensors_round_trip_is_exact_and_lmtrain_load_reads_it(tmp_path):
    pytest.importorskip("safetensors")
    import lmtrain

    _, run = train_small_run(tmp_path, [*TINY_WORD, "model.cell=gru", "train.max_steps=6", "train.epochs=1"])
    out = tmp_path / "hub"
    ok(cli("export", run, "--format", "safetensors", "--out", out))
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.model"]
    original, exported = load_run(run, torch.device("cpu")), load_run(out, torch.device("cpu"))
    for key, value in original.model.state_dict().items():
        assert torch.equal(value, exported.model.state_dict()[key]), key
    text = "the quick brown fox"
    assert lmtrain.load(out).perplexity(text) == lmtrain.load(run).perplexity(text)
    assert json.loads(ok(cli("evaluate", out, "--json")).stdout) == json.loads(ok(cli("evaluate", run, "--json")).stdout)
    # an export directory is read like a checkpoint: a damaged one is refused in one line
    meta = json.loads((out / "config.json").read_text())
    meta["config"]["model"]["hidden_size"] = 10**6
    (out / "config.json").write_text(json.dumps(meta))
    assert_one_error(cli("evaluate", out), "hidden_size")


@pytest.mark.parametrize("cell", ["lstm", "gru", "slstm"])
def test_the_onnx_step_gives_our_logits_for_50_steps(tmp_path, cell):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    import numpy as np

    _, run = train_small_run(tmp_path, [*TINY_WORD, "model.layers=2", f"model.cell={cell}", "train.max_steps=6",
                                        "train.epochs=1"])
    out = tmp_path / "step.onnx"
    ok(cli("export", run, "--format", "onnx", "--out", out))
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    model = load_run(run, torch.device("cpu")).model
    names = [i.name for i in session.get_inputs()]
    assert names[0] == "tokens" and len(names) == 1 + sum(len(layer.cell.STATE) for layer in model.layers)
    state = model.init_state(2)
    onnx_state = [s.numpy() for layer in state for s in layer]
    tokens = torch.randint(0, model.vocab_size, (50, 2), generator=torch.Generator().manual_seed(0))
    worst = 0.0
    for token in tokens:
        logits, *onnx_state = session.run(None, {"tokens": token.numpy(), **dict(zip(names[1:], onnx_state))})
        with torch.no_grad():
            ours, state = model(token.view(1, 2), state)
        worst = max(worst, float(np.abs(logits - ours[0].numpy()).max()))
    assert worst <= 1e-4


def test_an_export_never_replaces_the_run_it_reads(tmp_path):
    _, run = train_small_run(tmp_path, [*TINY_WORD, "train.max_steps=3", "train.epochs=1"])
    best = (run / "best.pt").read_bytes()
    for out in (run / "best.pt", run / "metrics.jsonl", run):
        assert_one_error(cli("export", run, "--format", "torch-lstm", "--out", out, "--force"), "one of its files")
    assert (run / "best.pt").read_bytes() == best
    ok(cli("export", run, "--format", "torch-lstm", "--out", run / "lstm.pt"))  # a file of its own beside them
