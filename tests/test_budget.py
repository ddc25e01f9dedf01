"""Time budgets: `lmtrain train --minutes M` (train.max_minutes) ends on time, mid-epoch if need be,
validated and checkpointed; model.size = "auto" sizes the model and the run to the budget from a
measured speed, leaving the keys the user gave alone; `--dry-run` prints the plan and writes nothing."""

from __future__ import annotations

import json
import math
import time
import tomllib

import pytest
import torch

from lmtrain.config import Config, given_keys, load_config
from lmtrain.text import TokenFile
from lmtrain.training import autosize
from tests.helpers import TINY_WORD, assert_one_error, cli, ok, private_cache_one_thread, sets, write_corpus


@pytest.fixture(scope="module", autouse=True)
def _private(tmp_path_factory):
    with private_cache_one_thread(tmp_path_factory):
        yield


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"), sizes=(300, 40, 40))


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_minutes_ends_mid_epoch_on_time_validated_and_checkpointed(corpus, tmp_path):
    budget_s = 6.0
    started = time.perf_counter()
    result = ok(cli("train", corpus, "--run-dir", tmp_path / "run", "--minutes", budget_s / 60,
                    *sets(*TINY_WORD, "train.epochs=100000", "train.log_interval=1000")))
    wall = time.perf_counter() - started
    last = records(tmp_path / "run")[-1]
    timing = [json.loads(line) for line in (tmp_path / "run" / "timing.jsonl").read_text().splitlines()]
    assert last["kind"] in ("stop", "epoch") and last["valid_loss"] > 0 and 1 < last["epoch"] < 100000
    assert budget_s <= timing[-1]["elapsed_s"] < budget_s + 5  # the last step started within the budget
    assert wall < budget_s + 8  # the final validation and checkpoint of a tiny model: well under a second or two
    assert (tmp_path / "run" / "last.pt").is_file() and (tmp_path / "run" / "best.pt").is_file()
    assert "min of the 0.1-minute budget" in result.stderr or "past the 0.1-minute budget" in result.stderr
    config = tomllib.loads((tmp_path / "run" / "config.toml").read_text())
    assert config["train"]["max_minutes"] == budget_s / 60 and config["model"]["size"] == "fixed"
    # spent: resuming says so, with the key to raise; raising it trains on from the exact position
    assert_one_error(cli("train", "--resume", tmp_path / "run"), "train.max_minutes = 0.1 are spent", "--set")
    ok(cli("train", "--resume", tmp_path / "run", "--set", f"train.max_minutes={budget_s / 60 + 0.02}"))
    assert records(tmp_path / "run")[-1]["step"] > last["step"]


def test_a_setup_that_spends_the_budget_still_gives_one_validated_step(corpus, tmp_path):
    result = ok(cli("train", corpus, "--run-dir", tmp_path / "run", "--minutes", "1e-6", *sets(*TINY_WORD)))
    (last,) = [r for r in records(tmp_path / "run") if r["kind"] != "train"]
    assert last["kind"] == "stop" and last["step"] == 1
    assert "past the 1e-06-minute budget" in result.stderr


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_bad_minutes_are_one_line(corpus, tmp_path, value):
    assert_one_error(cli("train", corpus, "--run-dir", tmp_path / "run", "--minutes", value), "--minutes must be")
    assert not (tmp_path / "run").exists()


def test_minutes_that_are_not_a_number_are_a_usage_error(corpus, tmp_path):
    result = cli("train", corpus, "--run-dir", tmp_path / "run", "--minutes", "ten")
    assert result.exit_code == 2 and "Traceback" not in result.output and "'--minutes'" in result.stderr
    assert not (tmp_path / "run").exists()


def test_dry_run_prints_the_resolved_config_and_plan_and_writes_nothing(corpus, tmp_path):
    result = ok(cli("train", corpus, "--run-dir", tmp_path / "run", "--dry-run", "--minutes", "3",
                    *sets("tokenizer.kind=word", "tokenizer.vocab_size=80", "train.batch_size=4")))
    assert not (tmp_path / "run").exists()
    toml_part, _, plan = result.stdout.partition("# tokens/s")
    resolved = tomllib.loads(toml_part)
    assert resolved["model"]["size"] == "fixed" and resolved["train"]["precision"] in ("fp32", "bf16")
    assert resolved["model"]["hidden_size"] in autosize.WIDTHS and resolved["train"]["lr_schedule"] == "cosine"
    assert resolved["train"]["max_steps"] > 0 and resolved["train"]["batch_size"] == 4  # given: kept
    assert "steps:" in plan and "expected finish:" in plan and "budget 3 min" in plan
    assert "model.size auto chose" in result.stderr
    path = tmp_path / "resolved.toml"
    path.write_text(toml_part)
    assert load_config(path).model.hidden_size == resolved["model"]["hidden_size"]  # it reads back


def test_dry_run_without_a_budget_probes_the_configured_model(corpus, tmp_path):
    result = ok(cli("train", corpus, "--dry-run", *sets(*TINY_WORD, "train.epochs=3")))
    resolved = tomllib.loads(result.stdout.partition("# tokens/s")[0])
    assert resolved["model"]["hidden_size"] == 16 and resolved["train"]["max_steps"] == 0
    assert "expected finish:" in result.stdout and "budget" not in result.stdout


def test_dry_run_refuses_resume(tmp_path):
    assert_one_error(cli("train", "--resume", tmp_path, "--dry-run"), "--dry-run")


def fake_data(train_tokens: int, valid_tokens: int = 1000) -> dict[str, TokenFile]:
    class Split:
        def __init__(self, n):
            self.tokens = torch.zeros(n, dtype=torch.int32).numpy()
    return {"train": Split(train_tokens), "valid": Split(valid_tokens)}


def resolve(monkeypatch, overrides, *, train_tokens=1_000_000, speed=lambda width: 4e6 / width):
    """autosize.resolve with a probe whose tokens/s is `speed(hidden_size)`, so that the choice is
    known in advance; returns (config, plan, the widths probed)."""
    probed = []

    def probe(config, vocab_size, train, device, steps=autosize.PROBE_STEPS):
        probed.append(config.model.hidden_size)
        return speed(config.model.hidden_size)

    monkeypatch.setattr(autosize, "probe", probe)
    config = load_config(None, overrides)
    resolved, plan = autosize.resolve(config, given_keys(None, overrides), vocab_size=1000, data=fake_data(train_tokens),
                                      device=torch.device("cpu"), started=time.perf_counter())
    return resolved, plan, probed


def expected_width(minutes: float, speed, corpus_tokens: int = 1_000_000) -> int:
    """The rule written out: the widest width whose budget gives TOKENS_PER_WEIGHT useful tokens
    (all within one pass, then the corpus times 1 + ln(passes)) per recurrent weight."""
    chosen = autosize.WIDTHS[0]
    for width in autosize.WIDTHS[1:]:
        weights = 2 * 4 * width * (2 * width + 2)  # two LSTM layers: W_ih, W_hh and two biases per gate
        tokens = speed(width) * (60 * minutes - autosize.validation_seconds(speed(width), fake_data(1)))
        passes = tokens / corpus_tokens
        useful = tokens if passes <= 1 else corpus_tokens * (1 + math.log(passes))
        if useful < autosize.TOKENS_PER_WEIGHT * weights:
            break
        chosen = width
    return chosen


def test_a_pass_over_seen_text_is_worth_less():
    assert autosize.useful_tokens(500, 1000) == 500 and autosize.useful_tokens(1000, 1000) == 1000
    assert autosize.useful_tokens(2000, 1000) == pytest.approx(1000 * (1 + math.log(2)))
    assert autosize.useful_tokens(1e6, 1000) < 1e6 / 50


@pytest.mark.parametrize("minutes", [0.5, 5.0, 50.0])
def test_auto_size_takes_the_widest_model_the_budget_trains_well(monkeypatch, minutes):
    speed = lambda width: 4e6 / width  # noqa: E731
    config, plan, probed = resolve(monkeypatch, [f"train.max_minutes={minutes}"], speed=speed)
    width = expected_width(minutes, speed)
    assert config.model.hidden_size == config.model.embedding_size == width and config.model.tie_weights
    assert probed == [*autosize.WIDTHS[: autosize.WIDTHS.index(width) + 2], width]  # then the chosen one, longer
    # the steps fill the budget at the probed speed (less the margin), and the rate ends with them
    tokens = config.train.max_steps * config.train.batch_size * config.train.bptt
    assert tokens == pytest.approx(autosize.SPEED_MARGIN * speed(width) * 60 * minutes, rel=0.03)
    assert config.train.epochs == math.ceil(config.train.max_steps / math.ceil(1_000_000 // 20 / 35))
    assert config.train.lr_schedule == "cosine" and config.model.size == "fixed" and plan.sized
    epochs = plan.epochs
    assert config.model.dropout == next(p for below, p in autosize.DROPOUT_BY_EPOCHS if epochs < below)


def test_more_passes_over_a_small_corpus_get_a_narrower_model_and_more_dropout(monkeypatch):
    big, _, _ = resolve(monkeypatch, ["train.max_minutes=10"], train_tokens=50_000_000)
    small, _, _ = resolve(monkeypatch, ["train.max_minutes=10"], train_tokens=100_000)
    assert small.model.dropout > big.model.dropout and small.model.hidden_size < big.model.hidden_size


def test_given_keys_win_over_auto(monkeypatch):
    config, plan, probed = resolve(monkeypatch, ["train.max_minutes=10", "model.hidden_size=96", "model.dropout=0.05",
                                                 "train.epochs=2", "train.lr_schedule=plateau"])
    assert probed == [96] and config.model.hidden_size == 96 and config.model.layers == 2
    assert config.model.embedding_size == 200 and not config.model.tie_weights  # the defaults, as not sized
    assert config.model.dropout == 0.05 and config.train.epochs == 2 and config.train.max_steps == 0
    assert config.train.lr_schedule == "plateau" and plan.sized


def test_without_a_budget_or_with_size_fixed_nothing_is_sized(monkeypatch):
    for overrides in ([], ["train.max_minutes=10", "model.size=fixed"]):
        config, plan, probed = resolve(monkeypatch, overrides)
        assert plan is None and probed == []
        assert (config.model.hidden_size, config.model.dropout, config.train.max_steps) == (200, 0.2, 0)
        assert config.model.size == "fixed" and config.train.precision in ("fp32", "bf16")


def test_a_config_built_in_code_is_not_sized(monkeypatch):
    monkeypatch.setattr(autosize, "probe", lambda *a: pytest.fail("probed"))
    config = load_config(None, ["train.max_minutes=10"])
    resolved, plan = autosize.resolve(config, None, vocab_size=100, data=fake_data(10_000), device=torch.device("cpu"),
                                      started=time.perf_counter())
    assert plan is None and resolved.model.hidden_size == Config().model.hidden_size


def test_precision_auto_is_bf16_only_where_bfloat16_products_are_fast(monkeypatch):
    from lmtrain.model import step_ops

    for offered, want in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(step_ops, "offers", lambda precision, device, offered=offered: offered)
        assert autosize.training_precision(torch.device("cpu")) == want


def test_given_keys_are_the_files_and_the_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[model]\nhidden_size = 64\n[train]\nlr = 0.1\n")
    assert given_keys(path, ["train.epochs=3", " model.dropout = 0.1"]) == {
        "model.hidden_size", "train.lr", "train.epochs", "model.dropout"}
    assert given_keys() == frozenset()


def test_the_probe_measures_real_training_steps():
    config = load_config(None, ["model.hidden_size=16", "model.embedding_size=8", "train.batch_size=4", "train.bptt=8",
                                "train.precision=fp32"])
    split = fake_data(10_000)["train"]
    assert 0 < autosize.probe(config, 50, split, torch.device("cpu")) < math.inf


def test_a_run_from_before_model_size_resumes(corpus, tmp_path):
    """config.toml and last.pt written before the key existed: it counts as its default on both sides."""
    from lmtrain.checkpoint import load_checkpoint, save_checkpoint

    run = tmp_path / "run"
    ok(cli("train", corpus, "--run-dir", run, *sets(*TINY_WORD, "train.max_steps=4")))
    lines = (run / "config.toml").read_text().splitlines()
    (run / "config.toml").write_text("\n".join(line for line in lines if not line.startswith("size = ")) + "\n")
    payload = load_checkpoint(run / "last.pt")
    del payload["config"]["model"]["size"]
    save_checkpoint(run / "last.pt", payload, keep_previous=False)
    ok(cli("train", "--resume", run, "--set", "train.max_steps=8"))
    assert records(run)[-1]["step"] == 8
