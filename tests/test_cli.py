"""End-to-end tests of the command line (train, evaluate, generate), run in-process with CliRunner.

Every model here is tiny and every corpus a few hundred generated lines, so the whole file runs in
seconds on a CPU. LMTRAIN_CACHE points at a temporary directory, so nothing lands in ~/.cache.
"""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from helpers import make_lines, write_corpus, write_lines
from typer.testing import CliRunner, Result

from lmtrain.checkpoint import save_checkpoint
from lmtrain.cli import app
from lmtrain.config import Config, ModelConfig, TokenizerConfig, TrainConfig, to_toml
from lmtrain.generation.sampler import SampleSettings, Sampler, StreamRandom
from lmtrain.model.saved import load_run
from lmtrain.text.tokenizer import EOS_ID

TINY = {
    "model.layers": 1,
    "model.hidden_size": 16,
    "model.embedding_size": 16,
    "train.batch_size": 4,
    "train.bptt": 8,
    "train.epochs": 1,
    "tokenizer.vocab_size": 60,
}

# --- helpers -------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def isolated_env(tmp_path_factory):
    """A private tokenizer/token cache and working directory for the whole module.

    Torch runs single-threaded: these models are too small to gain from threads, and spinning
    OpenMP threads slow down badly when the CPU is shared with other work.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        cache = tmp_path_factory.mktemp("cache")
        mp.setenv("LMTRAIN_CACHE", str(cache))
        mp.chdir(tmp_path_factory.mktemp("cwd"))  # a stray default runs/<name> would land here
        yield cache
    torch.set_num_threads(threads)


def overrides(**changes) -> list[str]:
    """--set arguments for the tiny config, with `changes` (section__key=value) applied."""
    settings = {**TINY, **{k.replace("__", "."): v for k, v in changes.items()}}
    return [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]


def cli(*args) -> Result:
    """Invoke the CLI in-process; stdout and stderr are kept apart (result.stdout, result.stderr)."""
    return CliRunner().invoke(app, [str(a) for a in args])


def ok(result):
    assert result.exit_code == 0, f"exit {result.exit_code}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}\n{result.exception!r}"
    return result


def train(corpus: Path, run_dir: Path, *extra, **changes):
    return ok(cli("train", corpus, "--run-dir", run_dir, *overrides(**changes), *extra))


def evaluate_json(*args) -> dict:
    return json.loads(ok(cli("evaluate", *args, "--json")).stdout)


def generate(*args) -> str:
    return ok(cli("generate", *args)).stdout


def assert_user_error(result, *fragments: str) -> str:
    """Exit code 2 and one `error: ...` line on stderr, naming the problem; return that line.

    The only other stderr line allowed is train's `corpus: ...` line, printed once the corpus
    has been read (so it precedes errors found after that, such as a too-small corpus).
    """
    assert result.exit_code == 2, f"exit {result.exit_code}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}\n{result.exception!r}"
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert lines[-1] == errors[0], result.stderr
    assert all(line.startswith("corpus: ") for line in lines[:-1]), result.stderr
    assert result.stdout == ""
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def expected_tokens(run: Path, lines: list[str]) -> int:
    """Tokens of `lines` by the run's tokenizer, counted independently of lmtrain: one <eos> per line."""
    kind = tomllib.loads((run / "config.toml").read_text())["tokenizer"]["kind"]
    if kind == "char":
        return sum(len(line) + 1 for line in lines)
    if kind == "word":
        return sum(len(line.split()) + 1 for line in lines)
    sp = spm.SentencePieceProcessor(model_proto=(run / "tokenizer.model").read_bytes())
    return sum(len(sp.encode(line)) + 1 for line in lines)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny BPE run shared by the end-to-end tests: (corpus directory, run directory, train's result)."""
    root = tmp_path_factory.mktemp("trained")
    corpus = write_corpus(root / "corpus")
    run = root / "run"
    return corpus, run, train(corpus, run)


# --- 1. end to end ---------------------------------------------------------------------------


def test_run_directory_contents(trained, isolated_env):
    _, run, _ = trained
    assert sorted(p.name for p in run.iterdir()) == [".lmtrain-run", ".lock", "best.pt", "config.toml", "last.pt",
                                                     "metrics.jsonl", "timing.jsonl", "tokenizer.model"]
    assert json.loads((run / ".lmtrain-run").read_text()) == {"format": "lmtrain-run", "version": 1}
    config = tomllib.loads((run / "config.toml").read_text())
    assert config["model"]["hidden_size"] == 16 and config["train"]["bptt"] == 8
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert len(epochs) == 1 and epochs[0]["epoch"] == 1 and epochs[0]["step"] > 0
    assert math.isfinite(epochs[0]["valid_loss"])
    # the tokenizer went to the cache named by LMTRAIN_CACHE
    assert list((isolated_env / "tokenizers").glob("*.model"))


def test_train_reports_on_stderr(trained):
    _, run, result = trained
    assert result.stdout == ""  # train's messages all go to stderr
    assert result.stderr.startswith("corpus: ")
    assert f"run in {run}" in result.stderr
    # the per-epoch summary line of the progress display
    assert "epoch   1 | step" in result.stderr, result.stderr


def test_evaluate_json(trained):
    corpus, run, _ = trained
    report = evaluate_json(run)
    assert {"tokens", "nll", "ppl", "word_ppl", "bits_per_byte"} <= report.keys()
    assert report["split"] == "test"
    test_lines = (corpus / "test.txt").read_text().splitlines()
    assert report["tokens"] > 0
    assert report["tokens"] == expected_tokens(run, test_lines)
    assert report["ppl"] == pytest.approx(math.exp(report["nll"]), rel=1e-9)
    vocab_size = spm.SentencePieceProcessor(model_proto=(run / "tokenizer.model").read_bytes()).get_piece_size()
    assert 1 < report["ppl"] < vocab_size  # one epoch already beats a uniform guess
    assert report["bits_per_byte"] > 0 and report["word_ppl"] > report["ppl"]


def test_evaluate_valid_split_text(trained):
    corpus, run, _ = trained
    out = ok(cli("evaluate", run, "--split", "valid")).stdout
    lines = out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("valid: ")
    n_valid = expected_tokens(run, (corpus / "valid.txt").read_text().splitlines())
    assert f"{n_valid:,} tokens" in lines[0]
    assert "ppl" in lines[0] and "bits/byte" in lines[0]


def test_evaluate_files(trained, tmp_path):
    _, run, _ = trained
    f1 = write_lines(tmp_path / "one.txt", make_lines(20, 101))
    f2 = write_lines(tmp_path / "two.txt", make_lines(30, 102))
    report = evaluate_json(run, f1, f2)
    assert [f["file"] for f in report["files"]] == [str(f1), str(f2)]
    singles = [evaluate_json(run, f) for f in (f1, f2)]
    for entry, single in zip(report["files"], singles):
        assert entry["tokens"] == single["tokens"] == expected_tokens(run, Path(entry["file"]).read_text().splitlines())
        assert entry["nll"] == pytest.approx(single["nll"], rel=1e-9)
    assert report["tokens"] == sum(f["tokens"] for f in report["files"])
    nll_sum = sum(f["nll"] * f["tokens"] for f in report["files"])
    assert report["nll"] == pytest.approx(nll_sum / report["tokens"], rel=1e-9)
    # the text form prints one line per file and one for both
    out = ok(cli("evaluate", run, f1, f2)).stdout.splitlines()
    assert [line.split(": ")[0] for line in out] == [str(f1), str(f2), "all"]


def test_evaluate_checkpoint_file(trained):
    _, run, _ = trained
    from_dir = evaluate_json(run)
    for name in ("best.pt", "last.pt"):  # one epoch: best and last hold the same model
        from_file = evaluate_json(run / name)
        assert from_file["tokens"] == from_dir["tokens"]
        assert from_file["nll"] == pytest.approx(from_dir["nll"], rel=1e-9)


def test_generate_is_reproducible_by_seed(trained):
    _, run, _ = trained
    first = generate(run, "--seed", "1", "--max-tokens", "50")
    again = generate(run, "--seed", "1", "--max-tokens", "50")
    other = generate(run, "--seed", "2", "--max-tokens", "50")
    assert first.strip()
    assert first == again
    assert first != other
    from_file = generate(run / "best.pt", "--seed", "1", "--max-tokens", "50")
    assert from_file == first


def test_generate_prompt_and_samples(trained):
    _, run, _ = trained
    out = generate(run, "--prompt", "The dog", "--seed", "3", "--max-tokens", "20")
    assert out.startswith("The dog")
    out = generate(run, "--num-samples", "3", "--seed", "3", "--max-tokens", "20")
    headers = [line for line in out.splitlines() if line.startswith("--- sample")]
    assert headers == ["--- sample 1", "--- sample 2", "--- sample 3"]
    greedy = [generate(run, "--temperature", "0", "--seed", str(s), "--max-tokens", "20") for s in (1, 2)]
    assert greedy[0] == greedy[1]  # greedy decoding ignores the seed


def test_generate_stops_formats_and_greedy(trained):
    _, run, _ = trained
    assert generate(run, "--greedy", "--max-tokens", "30") == generate(run, "--temperature", "0", "--max-tokens", "30")
    lines = generate(run, "--num-samples", "3", "--seed", "4", "--max-tokens", "60", "--until-eos", "--format", "jsonl").splitlines()
    samples = [json.loads(line) for line in lines]
    assert [s["sample"] for s in samples] == [1, 2, 3] and all("\n" not in s["text"] for s in samples)
    full = [json.loads(line)["text"] for line in generate(run, "--num-samples", "3", "--seed", "4", "--max-tokens", "60",
                                                           "--format", "jsonl").splitlines()]
    assert [f.split("\n")[0] for f in full] == [s["text"] for s in samples]  # the same draws, cut at <eos>
    one = generate(run, "--seed", "4", "--max-tokens", "60")
    stop = one[len(one) // 2 : len(one) // 2 + 3]
    cut_short = generate(run, "--seed", "4", "--max-tokens", "60", "--stop", stop)
    assert cut_short == one[: one.find(stop)] + "\n"


def test_generate_interactive_keeps_the_story(trained):
    _, run, _ = trained

    def talk(text: str) -> list[str]:
        args = ["generate", str(run), "--interactive", "--seed", "1", "--max-tokens", "12", "--format", "jsonl"]
        return [json.loads(line)["text"] for line in ok(CliRunner().invoke(app, args, input=text)).stdout.splitlines()]

    both = talk("The dog\nThe cat\n")
    assert len(both) == 2 and all(line.strip() for line in both), both
    assert talk("The dog\n") == both[:1]  # the first turn does not depend on what comes later
    loaded = load_run(run, torch.device("cpu"))
    ids = loaded.tokenizer.encode_prompt
    sampler, fresh = Sampler(loaded.model), Sampler(loaded.model)
    sampler.feed([EOS_ID] + ids("The dog"))
    list(sampler.draw(SampleSettings(12), StreamRandom(1, 1)))
    sampler.feed(ids("The cat"))
    fresh.feed([EOS_ID] + ids("The cat"))
    assert not torch.allclose(sampler.last, fresh.last)  # the second turn continues the first one's story


# --- 2, 3, 6. tokenizer kinds, a single-file corpus, CRLF --------------------------------------


@pytest.mark.parametrize("kind", ["word", "char"])
def test_other_tokenizer_kinds(kind, tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    run = tmp_path / "run"
    train(corpus, run, tokenizer__kind=kind)
    assert tomllib.loads((run / "config.toml").read_text())["tokenizer"]["kind"] == kind
    report = evaluate_json(run)
    test_lines = (corpus / "test.txt").read_text().splitlines()
    assert report["tokens"] == expected_tokens(run, test_lines)
    if kind == "word":  # words + line ends are the tokens, so word-level perplexity is the perplexity
        assert report["word_ppl"] == pytest.approx(report["ppl"], rel=1e-9)
    assert generate(run, "--seed", "1", "--max-tokens", "20").strip()


def test_single_file_corpus(tmp_path):
    lines = make_lines(400, 7)
    corpus = write_lines(tmp_path / "story.txt", lines)
    run = tmp_path / "run"
    train(corpus, run)
    assert (run / "best.pt").is_file()
    # 90/5/5 contiguous split: 20 lines each for valid and test, test being the last 20
    for split, part in (("valid", lines[360:380]), ("test", lines[380:])):
        report = evaluate_json(run, "--split", split)
        assert report["tokens"] == expected_tokens(run, part)


def test_crlf_corpus_reads_like_lf(tmp_path):
    lf_run, crlf_run = tmp_path / "lf-run", tmp_path / "crlf-run"
    train(write_corpus(tmp_path / "lf"), lf_run)
    crlf = write_corpus(tmp_path / "crlf", newline="\r\n")
    assert b"\r\n" in (crlf / "train.txt").read_bytes()
    train(crlf, crlf_run)
    assert (lf_run / "tokenizer.model").read_bytes() == (crlf_run / "tokenizer.model").read_bytes()
    for split in ("train", "test"):
        lf, cr = evaluate_json(lf_run, "--split", split), evaluate_json(crlf_run, "--split", split)
        assert cr["tokens"] == lf["tokens"] > 0
        assert cr["bits_per_byte"] == pytest.approx(lf["bits_per_byte"], rel=1e-6)  # bytes counted without \r


# --- 5. config precedence ----------------------------------------------------------------------


def test_config_precedence(tmp_path):
    config_file = tmp_path / "exp.toml"
    config_file.write_text("[train]\nlr = 0.5\nclip = 0.5\n\n[model]\nlayers = 1\n")
    run = tmp_path / "run"
    train(write_corpus(tmp_path / "corpus"), run, "--config", config_file, "--set", "train.lr=0.25")
    config = tomllib.loads((run / "config.toml").read_text())
    assert config["train"]["lr"] == 0.25  # --set beats the file
    assert config["train"]["clip"] == 0.5  # the file beats the defaults
    assert config["train"]["lr_decay"] == TrainConfig().lr_decay  # untouched keys keep their defaults
    assert config["train"]["seed"] == TrainConfig().seed
    assert config["model"]["init_range"] == ModelConfig().init_range
    assert config["model"]["tie_weights"] is ModelConfig().tie_weights
    assert config["tokenizer"]["kind"] == TokenizerConfig().kind
    # the training itself used the resolved lr
    epoch = next(json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"epoch"' in line)
    assert epoch["lr"] == 0.25


# --- 4. bad input ------------------------------------------------------------------------------


def corpus_without(*names):
    def make(tmp_path):
        folder = write_corpus(tmp_path / "corpus")
        for name in names:
            (folder / name).unlink()
        return folder

    return make


def corpus_file(data: bytes):
    def make(tmp_path):
        path = tmp_path / "corpus.txt"
        path.write_bytes(data)
        return path

    return make


def good_corpus(tmp_path):
    return write_corpus(tmp_path / "corpus")


def toml_file(text: str):
    def make(tmp_path):
        path = tmp_path / "bad.toml"
        path.write_text(text)
        return ["--config", path]

    return make


# id: (corpus maker, extra train arguments or a function of tmp_path giving them, fragments of the message)
TRAIN_ERRORS = {
    "missing-corpus": (lambda tmp: tmp / "no-such-corpus", [], ["corpus not found", "no-such-corpus"]),
    "no-train-txt": (corpus_without("train.txt"), [], ["lacks train.txt"]),
    "no-valid-txt": (corpus_without("valid.txt"), [], ["lacks valid.txt"]),
    "empty-file": (corpus_file(b""), [], ["corpus.txt", "is empty"]),
    "whitespace-only": (corpus_file(b"  \n\t\n \r\n\n"), [], ["corpus.txt", "only whitespace"]),
    "binary": (corpus_file(b"some text\n\x00\x01\x02\x03binary\n" * 50), [], ["corpus.txt", "binary", "NUL"]),
    "invalid-utf8": (corpus_file(b"hello world\nbad \xff byte\n" * 20), [], ["corpus.txt", "UTF-8", "offset 16"]),
    "too-small": (corpus_file(b"one line\ntwo line\nthree line\n"), ["--set", "train.batch_size=20", "--set", "train.bptt=35",
                                                                     "--set", "tokenizer.kind=word"],
                  ["too few for one batch"]),
    "unknown-set-key": (good_corpus, ["--set", "train.learning_rate=0.1"], ["train.learning_rate"]),
    "unknown-set-section": (good_corpus, ["--set", "optim.lr=0.1"], ["optim"]),
    "unknown-toml-key": (good_corpus, toml_file("[train]\nbatchsize = 8\n"), ["bad.toml", "train.batchsize"]),
    "unknown-toml-section": (good_corpus, toml_file("[optim]\nlr = 0.1\n"), ["bad.toml", "optim"]),
    "invalid-toml": (good_corpus, toml_file("[train\nlr = \n"), ["bad.toml", "not valid TOML"]),
    "wrong-type": (good_corpus, ["--set", "train.batch_size=abc"], ["train.batch_size", "int", "abc"]),
    "missing-config": (good_corpus, lambda tmp: ["--config", tmp / "nope.toml"], ["config file not found", "nope.toml"]),
    "invalid-choice": (good_corpus, ["--set", "model.cell=transformer"], ["model.cell", "transformer"]),
    "negative-value": (good_corpus, ["--set", "train.bptt=-1"], ["train.bptt", "positive"]),
    "malformed-set": (good_corpus, ["--set", "train.lr"], ["section.key=value"]),
}


@pytest.mark.parametrize("make_corpus, extra, fragments", TRAIN_ERRORS.values(), ids=TRAIN_ERRORS.keys())
def test_train_rejects_bad_input(make_corpus, extra, fragments, tmp_path):
    corpus = make_corpus(tmp_path)
    extra = extra(tmp_path) if callable(extra) else extra
    run = tmp_path / "run"
    result = cli("train", corpus, "--run-dir", run, *overrides(), *extra)
    assert_user_error(result, *fragments)
    assert not run.exists()
    assert not Path("runs").exists()


OLD_RUN_CONFIG = to_toml(Config())  # a run from before the marker: lmtrain's config.toml and a checkpoint


@pytest.mark.parametrize(
    "existing, flags, fragment",
    [
        ({"notes.txt": "keep me"}, [], "already exists and is not empty"),
        ({"notes.txt": "keep me"}, ["--overwrite"], "not an lmtrain run directory"),
        ({"config.toml": "# the user's own\n", "best.pt": "weights"}, ["--force"], "not an lmtrain run directory"),
        ({"config.toml": OLD_RUN_CONFIG, "best.pt": "weights"}, [], "pass --force"),
    ],
    ids=["non-empty", "overwrite-non-run", "force-foreign-config", "existing-run"],
)
def test_train_keeps_existing_run_dir(existing, flags, fragment, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name, text in existing.items():
        (run / name).write_text(text)
    result = cli("train", good_corpus(tmp_path), "--run-dir", run, *overrides(), *flags)
    assert_user_error(result, str(run), fragment)
    assert {p.name: p.read_text() for p in run.iterdir()} == existing


def test_train_overwrite_replaces_run(tmp_path):
    """--overwrite (the old --force) replaces a run from before the marker: its files, not the user's."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(OLD_RUN_CONFIG)
    (run / "best.pt").write_text("old weights")
    (run / "stale.txt").write_text("old")
    train(good_corpus(tmp_path), run, "--overwrite")
    assert (run / "stale.txt").read_text() == "old"
    assert (run / "best.pt").read_bytes() != b"old weights"
    assert tomllib.loads((run / "config.toml").read_text())["model"]["hidden_size"] == 16


def not_a_checkpoint(tmp_path):
    path = tmp_path / "x.pt"
    path.write_text("this is plain text, not a checkpoint\n")
    return path


def foreign_torch_file(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(2)}, path)
    return path


def empty_run_dir(tmp_path):
    (tmp_path / "empty-run").mkdir()
    return tmp_path / "empty-run"


# id: (command, target: "run" for the trained run or a function of tmp_path, arguments, fragments)
USE_ERRORS = {
    "evaluate-missing-run": ("evaluate", lambda tmp: tmp / "no-such-run", [], ["run not found", "no-such-run"]),
    "evaluate-empty-run-dir": ("evaluate", empty_run_dir, [], ["no checkpoint"]),
    "evaluate-not-a-checkpoint": ("evaluate", not_a_checkpoint, [], ["x.pt", "checkpoint"]),
    "evaluate-foreign-torch-file": ("evaluate", foreign_torch_file, [], ["weights.pt", "not an lmtrain checkpoint"]),
    "evaluate-bad-split": ("evaluate", "run", ["--split", "nonsense"], ["--split", "nonsense"]),
    "evaluate-bad-batch-size": ("evaluate", "run", ["--batch-size", "0"], ["--batch-size"]),
    "evaluate-missing-file": ("evaluate", "run", ["no-such-file.txt"], ["no-such-file.txt"]),
    "generate-missing-run": ("generate", lambda tmp: tmp / "no-such-run", [], ["run not found"]),
    "generate-not-a-checkpoint": ("generate", not_a_checkpoint, [], ["x.pt", "checkpoint"]),
    "generate-top-p-0": ("generate", "run", ["--top-p", "0"], ["--top-p", "0"]),
    "generate-negative-temperature": ("generate", "run", ["--temperature", "-1"], ["--temperature"]),
    "generate-zero-tokens": ("generate", "run", ["--max-tokens", "0"], ["--max-tokens"]),
}


@pytest.mark.parametrize("command, target, args, fragments", USE_ERRORS.values(), ids=USE_ERRORS.keys())
def test_evaluate_and_generate_reject_bad_input(command, target, args, fragments, tmp_path, request):
    run = request.getfixturevalue("trained")[1] if target == "run" else target(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    result = cli(command, run, *args)
    assert_user_error(result, *fragments)
    assert sorted(tmp_path.rglob("*")) == before  # nothing written


@pytest.mark.parametrize("cell", ["lstm", "peephole", "coupled", "gru", "rnn", "slstm", "mogrifier", "qrnn", "dglstm", "clockwork", "gru,lstm"])
def test_every_cell_trains_evaluates_and_samples(tmp_path, cell):
    corpus = write_corpus(tmp_path / "corpus", sizes=(120, 20, 20))
    run = tmp_path / "run"
    train(corpus, run, "--set", f"model.cell={cell}", "--set", "model.layers=2", "--set", "train.max_steps=6")
    metrics = evaluate_json(run, "--split", "valid")
    assert metrics["tokens"] > 0 and math.isfinite(metrics["ppl"])
    assert tomllib.loads((run / "config.toml").read_text())["model"]["cell"] == cell
    assert generate(run, "--seed", "3", "--max-tokens", "5") == generate(run, "--seed", "3", "--max-tokens", "5")


def test_a_checkpoint_saved_from_a_gpu_samples_on_the_cpu(trained, tmp_path, monkeypatch):
    """A checkpoint written on a CUDA machine records each tensor's device ("cuda:0"); loading it
    must map everything to the CPU. The file is made here by having torch.save tag every storage
    as CUDA, which is what it writes for tensors that live on a GPU."""
    _, run, _ = trained
    payload = torch.load(run / "best.pt", weights_only=True)
    gpu_file = tmp_path / "from-gpu.pt"
    with monkeypatch.context() as patch:
        patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        save_checkpoint(gpu_file, payload, keep_previous=False)
    if not torch.cuda.is_available():  # the file really claims CUDA: a plain load fails here
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(gpu_file, weights_only=True)
    text = ok(cli("generate", gpu_file, "--prompt", "The", "--max-tokens", "10", "--seed", "3")).stdout
    assert text.startswith("The") and len(text.strip()) > len("The")
    assert generate(gpu_file, "--prompt", "The", "--max-tokens", "10", "--seed", "3") == generate(run, "--prompt", "The", "--max-tokens", "10", "--seed", "3")
