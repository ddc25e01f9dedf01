"""`generate` streams and stays within bounds (issue 15, items 9-11), and the inputs that used to
give tracebacks give one `error:` line: text that is not UTF-8, seeds out of range, float options
that are not finite, an evaluation batch that cannot fit, files to evaluate that are pipes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import TINY_WORD, assert_one_error, cli, ok, private_cache_one_thread, train_small_run, write_lines

from lmtrain import memory
from lmtrain.generation import samples
from lmtrain.generation.sampler import SampleSettings, first_stop, sample
from lmtrain.generation.samples import StopCut, draw_samples, group_size, jsonl_records
from lmtrain.model.saved import load_run

SETTINGS = [
    *TINY_WORD, "train.max_steps=4",
]
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", autouse=True)
def isolated_env(tmp_path_factory):
    with private_cache_one_thread(tmp_path_factory):
        yield


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return train_small_run(tmp_path_factory.mktemp("trained"), SETTINGS)[1]


@pytest.fixture(scope="module")
def loaded(run):
    return load_run(run, torch.device("cpu"))


def joined(events) -> dict[int, str]:
    """Each sample's text from draw_samples' events, checking their order on the way."""
    texts: dict[int, str] = {}
    ended = []
    for k, text, end in events:
        assert not ended or k >= ended[-1] + (1 if k != ended[-1] else 0), "events out of order"
        assert k not in ended, f"sample {k} goes on after it ended"
        texts[k] = texts.get(k, "") + text
        if end:
            ended.append(k)
    assert ended == sorted(texts), "every sample ends exactly once, in order"
    return texts


def reference(loaded, seed: int, max_tokens: int, stops: tuple[str, ...], prompt: list[int] = ()) -> str:
    """One sample the way generate used to make it: every token, decoded, then cut at the first stop."""
    ids = torch.stack(list(sample(loaded.model, list(prompt), SampleSettings(max_tokens, seed=seed))), 1)[0]
    return first_stop(loaded.tokenizer.decode(ids.tolist()), list(stops))


# --- 9. streaming, in order, flat ---------------------------------------------------------------


@pytest.mark.parametrize("stops", [(), ("\n",), ("e",), ("er", "s.")])
def test_each_sample_is_the_single_sample_of_its_seed_whatever_the_group(loaded, stops):
    """Samples end at different times (stops), so the head hands over to samples that were held;
    the text is the same for every group size and equals the old decode-then-cut."""
    settings = SampleSettings(max_tokens=60, num_samples=5, seed=7, precision="fp32", stops=stops)
    expected = {k: reference(loaded, 7 + k - 1, 60, stops) for k in range(1, 6)}
    for group in (1, 2, 5):
        assert joined(draw_samples(loaded.model, loaded.tokenizer, [], settings, group=group)) == expected, group


def test_stop_cut_holds_back_only_what_may_begin_a_stop():
    cut = StopCut(["<end>", "xy"])
    out = [cut.feed(piece) for piece in ["ab", "c<e", "n", "d> more"]]
    assert out == ["ab", "c", "", ""] and cut.ended  # "<e" and "<en" held back; "<end>" never shown
    open_ended = StopCut(["<end>"])
    assert [open_ended.feed(p) for p in ["a<en", "d? b"]] == ["a", "<end? b"] and not open_ended.ended
    long = StopCut(["zzz"])
    for _ in range(10_000):
        long.feed("abcdefgh ")
    assert len(long.held) <= 2  # memory bounded by the stop's length, not the text's


def test_a_huge_max_tokens_draws_one_sample_at_a_time(loaded):
    """Nothing waits to be printed when a sample could be endless: one stream per group, and the
    first events come at once, whatever max_tokens."""
    huge = SampleSettings(max_tokens=10**9, num_samples=2, seed=1, precision="fp32")
    assert group_size(loaded.model, loaded.tokenizer, huge) == 1
    small = SampleSettings(max_tokens=20, num_samples=100_000_000, seed=1)
    assert group_size(loaded.model, loaded.tokenizer, small) == samples.MAX_STREAMS
    events = draw_samples(loaded.model, loaded.tokenizer, [], huge)
    start = time.monotonic()
    first = [next(events) for _ in range(300)]
    assert time.monotonic() - start < 10 and {k for k, _, _ in first} == {1}
    assert "".join(t for _, t, _ in first) == reference(loaded, 1, 300, ())[: len("".join(t for _, t, _ in first))]


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads resident memory from /proc (Linux)")
def test_memory_stays_flat_while_two_endless_samples_stream(loaded):
    resident = lambda: int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    events = draw_samples(loaded.model, loaded.tokenizer, [], SampleSettings(10**9, 2, seed=3, precision="fp32"))
    for _ in range(3000):
        next(events)
    before = resident()
    for _ in range(30_000):
        next(events)
    assert resident() - before < 8, "memory grew with the text drawn"


def test_jsonl_writes_a_long_sample_in_parts():
    chunk = "x" * 1000
    events = [(1, chunk, False)] * 70 + [(1, "end", True), (2, "", True)]
    records = list(jsonl_records(events, "p"))
    assert [r["done"] for r in records] == [False, True, True]
    assert "".join(r["text"] for r in records if r["sample"] == 1) == chunk * 70 + "end"
    assert all(len(r["text"]) <= samples.JSONL_PART_CHARS + 1000 for r in records)
    assert records[-1] == {"sample": 2, "prompt": "p", "text": "", "done": True}


def stream_command(run: Path, *args: str, lines: int, within: float = 60) -> list[str]:
    """Start `lmtrain generate RUN ARGS` and return its first `lines` lines of stdout, read within
    `within` seconds (start-up included); the process is killed after."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    child = subprocess.Popen([sys.executable, "-m", "lmtrain.cli", "generate", str(run), *args], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, env=env, text=True)
    got: list[str] = []
    reader = threading.Thread(target=lambda: [got.append(child.stdout.readline()) for _ in range(lines)], daemon=True)
    reader.start()
    reader.join(within)
    child.kill()
    child.wait()
    assert len(got) == lines and all(got), f"only {len(got)} of {lines} lines within {within} s: {got!r}"
    return got


def test_generate_streams_two_endless_samples(run, loaded):
    out = stream_command(run, "--max-tokens", "1000000000", "--num-samples", "2", "--seed", "5", "--precision", "fp32",
                         lines=3)
    assert out[0] == "--- sample 1\n"
    assert "".join(out[1:]) == reference(loaded, 5, 400, ())[: len("".join(out[1:]))]
    (record,) = stream_command(run, "--max-tokens", "1000000000", "--num-samples", "2", "--seed", "5", "--format", "jsonl",
                               "--precision", "fp32", lines=1)
    record = json.loads(record)
    assert record["sample"] == 1 and record["done"] is False and len(record["text"]) >= samples.JSONL_PART_CHARS


def test_a_hundred_million_samples_stream_instead_of_allocating(run):
    out = stream_command(run, "--num-samples", "100000000", "--max-tokens", "3", "--seed", "1", lines=4)
    assert out[0] == "--- sample 1\n" and out[2] == "--- sample 2\n"


def test_a_model_whose_one_stream_cannot_fit_is_refused_up_front(run, monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: 1000)
    result = cli("generate", run, "--num-samples", "2")
    assert_one_error(result, "one sample of this model", "needs about")
    assert result.stdout == ""


@pytest.mark.parametrize("fmt", ["text", "jsonl"])
@pytest.mark.parametrize("stop", [[], ["--until-eos"], ["--stop", "e"]])
def test_sample_i_is_the_single_sample_seeded_seed_plus_i(run, fmt, stop):
    many = ok(cli("generate", run, "--num-samples", "3", "--seed", "11", "--max-tokens", "40", "--format", fmt, *stop)).stdout
    singles = [ok(cli("generate", run, "--seed", str(11 + i), "--max-tokens", "40", "--format", fmt, *stop)).stdout
               for i in range(3)]
    if fmt == "text":
        assert many == "".join(f"--- sample {i + 1}\n{s}" for i, s in enumerate(singles))
    else:
        records = [json.loads(line) for line in many.splitlines()]
        assert [r["sample"] for r in records] == [1, 2, 3]
        assert [r["text"] for r in records] == [json.loads(s)["text"] for s in singles]
        assert all(r["done"] for r in records)
    if stop:
        assert all(stop[-1].replace("--until-eos", "\n") not in json.loads(s)["text"] for s in singles) if fmt == "jsonl" else True


# --- 10. text that is not UTF-8, seeds out of range ---------------------------------------------


def test_a_prompt_that_is_not_utf8_is_one_line_or_replaced(run):
    bad = os.fsdecode(b"The \xff dog")  # what Python makes of such bytes on the command line
    assert_one_error(cli("generate", run, "--prompt", bad), "--prompt", "not valid UTF-8", "0xff", "offset 4")
    out = ok(cli("generate", run, "--prompt", bad, "--encoding-errors", "replace", "--max-tokens", "3")).stdout
    assert out.startswith("The \ufffd dog")
    assert_one_error(cli("generate", run, "--encoding-errors", "lenient"), "--encoding-errors")


def test_standard_input_that_is_not_utf8_is_one_line_or_replaced(run):
    from typer.testing import CliRunner

    from lmtrain.cli import app

    args = ["generate", str(run), "--interactive", "--seed", "1", "--max-tokens", "4", "--format", "jsonl"]
    result = CliRunner().invoke(app, args, input=b"The dog\nThe \xfe cat\n")
    assert_one_error(result, "line 2 of standard input", "0xfe")
    assert len(result.stdout.splitlines()) == 1  # the first turn was answered
    result = ok(CliRunner().invoke(app, [*args, "--encoding-errors", "replace"], input=b"The dog\nThe \xfe cat\n"))
    assert [json.loads(line)["prompt"] for line in result.stdout.splitlines()] == ["The dog", "The \ufffd cat"]


@pytest.mark.parametrize("seed, samples_, fragments", [
    ("99999999999999999999999", "1", ["--seed 99999999999999999999999", "out of range", "18446744073709551615"]),
    ("-9223372036854775809", "1", ["out of range"]),
    ("18446744073709551615", "2", ["18446744073709551616", "out of range"]),
])
def test_a_seed_out_of_range_is_one_line(run, seed, samples_, fragments):
    result = cli("generate", run, "--seed", seed, "--num-samples", samples_)
    assert_one_error(result, *fragments)
    assert result.stdout == ""


def test_the_seed_range_is_usable_to_its_ends(run):
    ok(cli("generate", run, "--seed", "18446744073709551615", "--max-tokens", "2"))
    ok(cli("generate", run, "--seed", "-9223372036854775808", "--num-samples", "2", "--max-tokens", "2"))


# --- 11. float options that are not finite ------------------------------------------------------


def float_options() -> list[tuple[str, str]]:
    """(command, option) for every float option of every command, present and future."""
    from typer.main import get_command

    from lmtrain.cli import app

    commands = get_command(app).commands
    return [(name, param.opts[0]) for name, command in sorted(commands.items()) for param in command.params
            if isinstance(param.default, float) and not getattr(param, "is_flag", False)]


def test_the_float_options_are_found():
    found = set(float_options())
    assert {("generate", "--temperature"), ("generate", "--top-p"), ("evaluate", "--dynamic-lr"),
            ("evaluate", "--dynamic-decay"), ("evaluate", "--cache-theta"), ("evaluate", "--cache-lambda")} <= found


@pytest.mark.parametrize("command, option", float_options())
@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_every_float_option_refuses_a_value_that_is_not_finite(run, command, option, value):
    from typer.main import get_command

    from lmtrain.cli import app

    arguments = [run for p in get_command(app).commands[command].params if p.param_type_name == "argument" and p.required]
    result = cli(command, *arguments, option, value)
    assert_one_error(result, option, "finite", value)
    assert result.stdout == ""


# --- 10, 11. evaluate: a batch that cannot fit, pipes -------------------------------------------


def test_a_huge_evaluation_batch_is_one_line_up_front(run):
    start = time.monotonic()
    assert_one_error(cli("evaluate", run, "--batch-size", "100000000"), "100,000,000 streams", "--batch-size", "needs about")
    assert time.monotonic() - start < 10
    assert_one_error(cli("evaluate", run, "--batch-size", "5000"), "--batch-size 5,000", "tokens of test", "at most")


def test_evaluate_reads_a_fifo_once(run, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    text = ["A dog sees the river.", "The cat likes a small house."]
    regular = write_lines(tmp_path / "regular.txt", text)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_bytes(regular.read_bytes()), daemon=True)
    writer.start()
    from_fifo = json.loads(ok(cli("evaluate", run, fifo, "--json")).stdout)
    writer.join(10)
    from_file = json.loads(ok(cli("evaluate", run, regular, "--json")).stdout)
    assert from_fifo["files"][0]["file"] == str(fifo)
    assert {k: v for k, v in from_fifo.items() if k != "files"} == {k: v for k, v in from_file.items() if k != "files"}
    assert list((tmp_path / "tmp").iterdir()) == []  # the temporary copy is gone


def test_evaluate_reads_standard_input_and_names_it_in_errors(run, tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    command = [sys.executable, "-m", "lmtrain.cli", "evaluate", str(run), "/dev/stdin", "--json"]
    good = subprocess.run(command, input=b"A dog sees the river.\n", capture_output=True, env=env, timeout=120)
    assert good.returncode == 0, good.stderr
    assert json.loads(good.stdout)["tokens"] > 0
    bad = subprocess.run(command, input=b"A \xff dog\n", capture_output=True, env=env, timeout=120)
    assert bad.returncode == 2 and b"Traceback" not in bad.stderr
    assert bad.stderr.decode().splitlines() == ["error: /dev/stdin is not valid UTF-8 (byte 0xff at offset 2); "
                                                "fix the file or read it with --encoding-errors replace"]
    binary = subprocess.run(command, input=b"A\0", capture_output=True, env=env, timeout=120)
    assert binary.returncode == 2 and binary.stderr.decode().startswith("error: /dev/stdin looks binary")


def test_a_corpus_that_is_a_pipe_is_one_line(tmp_path):
    fifo = tmp_path / "corpus.txt"
    os.mkfifo(fifo)
    result = cli("train", fifo, "--run-dir", tmp_path / "run")
    assert_one_error(result, str(fifo), "not a regular file", "save it to a file")
    assert not (tmp_path / "run").exists()
