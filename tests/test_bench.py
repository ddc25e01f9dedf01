"""The benchmark's plumbing on a tiny setting: record fields, interleaving, memory accounting."""

import json

import torch
from typer.testing import CliRunner

from lmtrain.cli import app
from lmtrain.tools.bench_timing import peak_memory_mb, time_round_robin

FIELDS = {"cell", "impl", "layers", "hidden_size", "batch_size", "bptt", "dtype", "tokens_per_s", "peak_mem_mb", "ratio_vs_torch"}


def test_bench_json_records():
    args = ["bench", "--json", "--sizes", "16", "--dtypes", "fp32", "--cells", "lstm,gru", "--repeats", "5",
            "--warmup", "1", "--bptt", "4", "--batch-size", "2", "--vocab-size", "50", "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert all(FIELDS <= set(r) for r in records)
    stack = {(r["cell"], r["impl"]) for r in records if r["what"] == "stack"}
    assert stack == {("lstm", "torch"), ("lstm", "ours"), ("gru", "ours")}
    steps = [r for r in records if r["what"] == "step"]
    assert {r["impl"] for r in steps} == {"ours", "torch"}
    for r in records:
        assert r["tokens_per_s"] > 0 and r["peak_mem_mb"] > 0
        torch_rate = next(t["tokens_per_s"] for t in records if t["what"] == r["what"] and t["impl"] == "torch")
        assert abs(r["ratio_vs_torch"] - r["tokens_per_s"] / torch_rate) < 1e-9 * r["ratio_vs_torch"] + 1e-12


def test_bench_rejects_unknown_cell():
    result = CliRunner().invoke(app, ["bench", "--cells", "lstm,transformer"])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == ["error: --cells: unknown cell 'transformer' (known: lstm, peephole, coupled, gru, rnn, slstm)"]


def test_round_robin_interleaves_and_takes_medians():
    order = []
    medians = time_round_robin({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, repeats=5, warmup=1, device=torch.device("cpu"))
    assert order == ["a", "b"] * 6
    assert set(medians) == {"a", "b"}


def test_peak_memory_counts_tensors_alive_together():
    def run():
        a = torch.ones(1 << 20)  # 4 MiB
        b = a * 2  # 4 MiB more while a is alive
        del a
        c = b + 1  # a is gone: 8 MiB again, not 12
        del b, c

    assert abs(peak_memory_mb(run, torch.device("cpu")) - 8.0) < 0.1


def test_bench_preset_runs_each_of_its_settings_for_the_lstm(monkeypatch):
    """--preset replaces --cells/--sizes/--layers/--batch-size/--bptt by the preset's settings
    (shrunk here: the real issue7 sizes take minutes on a CPU). No CUDA: no "ours+graphs" rows."""
    from lmtrain.tools import bench

    monkeypatch.setitem(bench.PRESETS, "issue7", (bench.Setting(2, 8, 2, 3), bench.Setting(1, 6, 3, 4)))
    args = ["bench", "--preset", "issue7", "--json", "--dtypes", "fp32", "--cells", "gru", "--sizes", "99",
            "--repeats", "1", "--warmup", "0", "--vocab-size", "20", "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    seen = {(r["what"], r["cell"], r["impl"], r["layers"], r["hidden_size"], r["batch_size"], r["bptt"]) for r in records}
    assert seen == {(what, "lstm", impl, *shape) for what in ("stack", "step") for impl in ("ours", "torch")
                    for shape in ((2, 8, 2, 3), (1, 6, 3, 4))}
    assert len(records) == len(seen)


def test_bench_rejects_unknown_preset():
    result = CliRunner().invoke(app, ["bench", "--preset", "issue8"])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == ["error: --preset: unknown preset 'issue8' (known: issue7)"]


def test_bench_generate_times_every_precision_and_the_step_op_by_op():
    from lmtrain.config import ModelConfig
    from lmtrain.model.language_model import LanguageModel
    from lmtrain.generation.stepper import Stepper, available_precisions

    args = ["bench", "--generate", "--json", "--sizes", "16", "--vocab-size", "50", "--streams", "1,3", "--tokens", "4",
            "--repeats", "1", "--warmup", "0", "--batch-size", "2", "--bptt", "3"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    have = available_precisions(torch.device("cpu"))
    generated = {(r["what"], r["precision"], r["streams"]) for r in records if r["what"].startswith("generate")}
    expected = {("generate", p, n) for p in have for n in (1, 3)}
    if Stepper(LanguageModel(ModelConfig(layers=2, embedding_size=16, hidden_size=16), 50), have[-1]).stack is not None:
        # compiled products: the LSTM's step is one op, timed against its op-by-op reference
        expected |= {("generate, op by op", have[-1], n) for n in (1, 3)}
    assert generated == expected
    assert all(r["tokens_per_s"] > 0 for r in records)
    assert {r["what"] for r in records} - {w for w, _, _ in generated} == {"evaluate", "train forward"}


def test_fp32_benchmarks_run_without_tf32_and_put_the_switches_back(monkeypatch):
    """cuDNN's LSTM takes TF32 by default in fp32; ours never does: the benchmark turns it off for
    both while it runs, and restores what was set."""
    from lmtrain.tools import bench

    seen = []
    monkeypatch.setattr(bench, "stack_records", lambda *a, **k: seen.append(
        (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)) or [])
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    bench.bench_stacks(["lstm"], [8], ["fp32"], layers=1, batch=2, bptt=3, repeats=1, warmup=0, device=torch.device("cpu"))
    assert seen == [(False, False)] and torch.backends.cudnn.allow_tf32 is True
