"""The benchmark's plumbing on a tiny setting: record fields, interleaving, memory accounting."""

import json
import random
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from lmtrain.cli import app
from lmtrain.tools.bench_timing import peak_memory_mb, time_round_robin

FIELDS = {"cell", "impl", "layers", "hidden_size", "batch_size", "bptt", "dtype", "tokens_per_s", "peak_mem_mb",
          "reference", "ratio_vs_reference", "ratio_vs_our_lstm"}


def test_bench_json_records_name_their_reference_and_both_ratios():
    args = ["bench", "--json", "--sizes", "16", "--dtypes", "fp32", "--cells", "lstm,gru,rnn,peephole", "--repeats", "1",
            "--warmup", "0", "--bptt", "4", "--batch-size", "2", "--vocab-size", "50", "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert all(FIELDS <= set(r) for r in records)
    stack = {(r["cell"], r["impl"]): r for r in records if r["what"] == "stack"}
    assert set(stack) == {("lstm", "torch"), ("gru", "torch"), ("rnn", "torch"),
                          ("lstm", "ours"), ("gru", "ours"), ("rnn", "ours"), ("peephole", "ours")}
    torch_rate = {cell: r["tokens_per_s"] for (cell, impl), r in stack.items() if impl == "torch"}
    for cell, reference, reference_cell in [("lstm", "torch.nn.LSTM", "lstm"), ("gru", "torch.nn.GRU", "gru"),
                                            ("rnn", "torch.nn.RNN", "rnn"), ("peephole", "torch.nn.LSTM", "lstm")]:
        r = stack[cell, "ours"]
        assert r["reference"] == reference
        assert r["ratio_vs_reference"] == r["tokens_per_s"] / torch_rate[reference_cell]
        assert r["ratio_vs_our_lstm"] == r["tokens_per_s"] / stack["lstm", "ours"]["tokens_per_s"]
    steps = {r["impl"]: r for r in records if r["what"] == "step"}
    assert set(steps) == {"ours", "torch"} and steps["ours"]["reference"] == "torch.nn.LSTM"
    assert steps["ours"]["ratio_vs_reference"] == steps["ours"]["tokens_per_s"] / steps["torch"]["tokens_per_s"]
    for r in records:
        assert r["tokens_per_s"] > 0 and r["peak_mem_mb"] > 0
        if r["impl"] == "torch":
            assert r["reference"] is r["ratio_vs_reference"] is r["ratio_vs_our_lstm"] is None


def test_only_the_references_of_the_cells_asked_for_are_timed():
    """gru and rnn alone: torch.nn.GRU and torch.nn.RNN (tanh) run, torch.nn.LSTM does not, and
    with no lstm of ours timed there is no ratio to it."""
    from lmtrain.tools import bench

    records = bench.bench_stacks(["rnn", "gru"], [8], ["fp32"], layers=1, batch=2, bptt=3, repeats=1, warmup=0,
                                 device=torch.device("cpu"))
    assert [(r.cell, r.impl, r.reference) for r in records] == [
        ("gru", "torch", None), ("rnn", "torch", None), ("rnn", "ours", "torch.nn.RNN"), ("gru", "ours", "torch.nn.GRU")]
    gru = {r.impl: r for r in records if r.cell == "gru"}
    assert gru["ours"].ratio_vs_reference == gru["ours"].tokens_per_s / gru["torch"].tokens_per_s
    assert all(r.ratio_vs_our_lstm is None for r in records)
    torch_rnn = bench.TorchStack("rnn", 1, 8).rnn
    assert isinstance(torch_rnn, torch.nn.RNN) and torch_rnn.nonlinearity == "tanh"


def test_the_table_shows_the_reference_and_both_ratios():
    from lmtrain.tools.bench import Record, compared, format_table

    def record(cell, impl, tokens_per_s):
        return Record("stack", cell, impl, 2, 200, 20, 35, "bf16", "cpu", tokens_per_s, 10.0)

    records = compared([record("lstm", "torch", 1000.0), record("lstm", "ours", 1500.0), record("slstm", "ours", 600.0)])
    lines = format_table(records).splitlines()
    assert lines[0].split(" | ")[-3:] == ["reference", "ours / reference", "ours / our lstm |"]
    assert lines[2:] == [
        "| stack | lstm | torch | 2 × 200 | 20 | 35 | bf16 | 1,000 | 10.0 |  |  |  |",
        "| stack | lstm | ours | 2 × 200 | 20 | 35 | bf16 | 1,500 | 10.0 | torch.nn.LSTM | 1.50 | 1.00 |",
        "| stack | slstm | ours | 2 × 200 | 20 | 35 | bf16 | 600 | 10.0 | torch.nn.LSTM | 0.60 | 0.40 |",
    ]


def test_bench_rejects_unknown_cell():
    result = CliRunner().invoke(app, ["bench", "--cells", "lstm,transformer"])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == ["error: --cells: unknown cell 'transformer' (known: lstm, peephole, coupled, gru, rnn, slstm, mogrifier, qrnn, dglstm, clockwork)"]


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


def test_bench_loop_times_both_loops_each_in_a_process_of_its_own(tmp_path, monkeypatch):
    from lmtrain.tools import bench_loop
    rng = random.Random(0)
    words = [f"w{i}" for i in range(200)]
    for split, lines in (("train", 120), ("valid", 12), ("test", 12)):
        (tmp_path / f"{split}.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(20))
                                                         for _ in range(lines)) + "\n")
    children = []
    real = bench_loop.run_child
    monkeypatch.setattr(bench_loop, "run_child", lambda impl, *a, **k: children.append(impl) or real(impl, *a, **k))
    result = CliRunner().invoke(app, ["bench", "--loop", "--corpus", str(tmp_path), "--steps", "3", "--warmup-steps",
                                      "2", "--repeats", "2", "--dtypes", "fp32", "--json"])
    assert result.exit_code == 0, result.output
    records = {r["impl"]: r for r in map(json.loads, result.stdout.splitlines())}
    assert children == ["plain", "ours", "plain", "ours"]  # interleaved rounds, one process per loop
    assert records["plain"]["ratio_vs_plain"] == 1.0 and records["ours"]["precision"] == "fp32"
    assert records["ours"]["tokens_per_s"] > 0 and records["ours"]["ratio_vs_plain"] > 0
    assert records["ours"]["steps"] == 3 and records["ours"]["rounds"] == 2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator settings")
def test_freed_blocks_are_kept_for_reuse_once_the_console_script_asks():
    """A 32 MB tensor made and freed again and again: with the default allocator each one is a
    fresh mapping whose 8,192 pages fault in again; kept, the heap settles after a few rounds
    and the last ones reuse its pages."""
    probe = ("import resource, sys, torch\n"
             "from lmtrain.runtime import keep_freed_memory\n"
             "assert keep_freed_memory() if sys.argv[1] == 'keep' else True\n"
             "for _ in range(20): torch.ones(8 << 20)\n"
             "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
             "for _ in range(5): torch.ones(8 << 20)\n"
             "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n")
    faults = {how: int(subprocess.run([sys.executable, "-c", probe, how], capture_output=True, text=True,
                                      check=True).stdout) for how in ("default", "keep")}
    assert faults["default"] > 30_000 and faults["keep"] < 2_000, faults
