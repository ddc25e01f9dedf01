"""A run's config made concrete before its model is built: train.precision = "auto", and with a
time budget (train.max_minutes, `lmtrain train --minutes M`) model.size = "auto".

    resolve(config, given, ...) -> (config, plan)

train.precision "auto" becomes bf16 where this device multiplies in bfloat16 fast (a CUDA GPU that
supports it; a CPU whose compiled kernels have AVX512-BF16 products) and fp32 elsewhere.

model.size "auto" with a budget: the model is the widest of WIDTHS (two tied layers) that the
budget can train on at least TOKENS_PER_WEIGHT tokens per recurrent weight (`useful_tokens`: a
pass over text already seen counts for less than the first), at the speed measured here
(`probe`: a few real training steps of each width, narrowest first, on the corpus's first
windows); then train.max_steps is set so that the steps fill the budget at the measured speed
(train.epochs as many as that takes) and train.lr_schedule, unless given, is cosine, so that the
rate comes down to 0 as the budget ends; the dropout follows the epochs planned
(DROPOUT_BY_EPOCHS: none for about one pass, more the more passes).
Keys the config gives (`given`: its TOML file and `--set`) are never changed: giving any of
SIZE_KEYS keeps the model as configured, any of LENGTH_KEYS the run's length, any of DROPOUT_KEYS
the dropout. The resolved values are what config.toml and the checkpoints store, with model.size
"fixed", so a resumed or repeated run trains the same model.

The budget counts from the command's start (`started`, time.perf_counter()): reading and
tokenizing the corpus, the one-time C++ build and the probe are spent from it, and the final
validation and checkpoint are planned for (VALIDATION_SHARE of a training step's time per token).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from dataclasses import dataclass

import torch

from lmtrain.config import Config, from_dict, to_dict
from lmtrain.model import LanguageModel, detach_state, step_ops
from lmtrain.text import EOS_ID, TokenFile, lazy_batchify, windows
from lmtrain.training.distributed import WindowForward
from lmtrain.training.loop import gradient_norm, make_optimizer, train_window
from lmtrain.training.preflight import parameter_count

WIDTHS = (128, 192, 256, 384, 512, 768, 1024)  # the units of both layers, embedding tied
# useful training tokens (useful_tokens) per recurrent weight the budget must give a width for it
# to be chosen: a wider model learns more per token but needs more of them. Fitted to the 5-minute
# sweep of docs/defaults.md: there the best width was at 0.86 (the built-in corpus, 192 units) and
# 0.94 (PTB, 384), and the next wider one lost at 0.43 (the built-in corpus, 256)
TOKENS_PER_WEIGHT = 0.6
DROPOUT_BY_EPOCHS = ((1.5, 0.0), (3.0, 0.1), (8.0, 0.2), (20.0, 0.3), (math.inf, 0.4))  # (epochs below, dropout)
SPEED_MARGIN = 0.95  # steps are planned at this share of the probed speed: the machine may slow down
VALIDATION_SHARE = 0.35  # a validation token's time, as a share of a training token's (forward only, larger batches)
PROBE_WARMUP, PROBE_STEPS = 3, 5  # untimed steps (the first builds and compiles), then the timed ones
CHECKPOINT_S = 0.2  # writing last.pt (and best.pt) after a validation: a small model's take a tenth of a second
FINAL_PROBE_STEPS = 15  # the chosen model's speed, which sets the run's length, is measured longer
SIZE_KEYS = ("model.layers", "model.hidden_size", "model.embedding_size", "model.tie_weights")
LENGTH_KEYS = ("train.epochs", "train.max_steps")
DROPOUT_KEYS = ("model.dropout", "model.dropout_input", "model.dropout_hidden", "model.dropout_output")


@dataclass(frozen=True)
class Plan:
    """What the resolution measured and expects (`lmtrain train --dry-run` prints it)."""

    tokens_per_s: float  # the chosen model's training speed, probed here
    probed: tuple[tuple[int, float], ...]  # (hidden size, tokens/s) of each width model.size = auto tried
    steps: int  # optimizer steps the run will take (train.max_steps, or its epochs' steps)
    epochs: float  # passes over the training split those steps make
    finish_s: float  # expected seconds from the command's start to the end, final validation included
    sized: bool  # whether model.size = auto chose the model, dropout and length


def resolve(config: Config, given: frozenset[str] | None, *, vocab_size: int, data: dict[str, TokenFile],
            device: torch.device, started: float, several_processes: bool = False,
            probe_always: bool = False) -> tuple[Config, Plan | None]:
    """`config` with train.precision and (under a budget) model.size = "auto" made concrete, and the
    plan (None when nothing was probed). `given`: the keys the user gave (None: all of them, as for
    a config built in code or a reproduction's); `started`: the command's start; `probe_always`:
    probe the configured model even without auto sizing (for --dry-run's figures)."""
    tc = config.train
    if tc.precision == "auto":
        config = replace(config, "train", precision=training_precision(device))
        tc = config.train
    sizing = (config.model.size == "auto" and tc.max_minutes > 0 and given is not None and not several_processes)
    if not sizing:
        config = replace(config, "model", size="fixed")
        if not probe_always:
            return config, None
        speed = probe(config, vocab_size, data["train"], device)
        return config, plan_for(config, speed, (), data, started, sized=False)
    config, probed = (config, []) if any(key in given for key in SIZE_KEYS) else widest(config, vocab_size, data, device, started)
    speed = probe(config, vocab_size, data["train"], device, steps=FINAL_PROBE_STEPS)  # it sets the run's length
    if not any(key in given for key in LENGTH_KEYS):
        steps = fill(config, speed, started, data)
        config = replace(config, "train", max_steps=steps, epochs=math.ceil(steps / steps_per_epoch(config, data)))
    if "train.lr_schedule" not in given:
        config = replace(config, "train", lr_schedule="cosine")  # down to 0 at the last planned step
    if not any(key in given for key in DROPOUT_KEYS):
        epochs = planned_steps(config, data) / steps_per_epoch(config, data)
        config = replace(config, "model", dropout=next(p for below, p in DROPOUT_BY_EPOCHS if epochs < below))
    config = from_dict(to_dict(replace(config, "model", size="fixed")))  # checked as any config is
    return config, plan_for(config, speed, tuple(probed), data, started, sized=True)


def widest(config: Config, vocab_size: int, data: dict[str, TokenFile], device: torch.device,
           started: float) -> tuple[Config, list[tuple[int, float]]]:
    """`config` with the widest model of WIDTHS that the budget trains well (the module's rule),
    and the (width, tokens/s) of each width probed, narrowest first, up to the first too wide."""
    chosen, probed = None, []
    for width in WIDTHS:
        candidate = replace(config, "model", layers=2, hidden_size=width, embedding_size=width, tie_weights=True)
        rate = probe(candidate, vocab_size, data["train"], device)
        probed.append((width, rate))
        budget_tokens = rate * train_seconds(config, started, rate, data)
        weights = parameter_count(candidate.model, 1)  # the recurrent ones: a vocabulary of one
        if chosen is not None and useful_tokens(budget_tokens, len(data["train"].tokens)) < TOKENS_PER_WEIGHT * weights:
            break  # too wide for the budget (the narrowest is taken whatever its rate)
        chosen = candidate
    return chosen, probed


def describe(plan: Plan, config: Config) -> str:
    """One line of what the resolution chose and expects, for the user."""
    m, tc = config.model, config.train
    tried = ", ".join(f"{width}: {rate:,.0f}" for width, rate in plan.probed)
    chosen = (f"model.size auto chose {m.layers} x {m.hidden_size}{' tied' if m.tie_weights else ''}, dropout {m.dropout:g}, "
              if plan.sized else "")
    budget = f" of the {tc.max_minutes:g}-minute budget" if tc.max_minutes else ""
    return (f"{chosen}{plan.steps:,} steps ({plan.epochs:.2f} epochs), {tc.precision}, {plan.tokens_per_s:,.0f} tokens/s"
            + (f" (widths probed, tokens/s: {tried})" if tried else "")
            + f"; expected to end {plan.finish_s / 60:.1f} min after the start{budget}, final validation included")


def training_precision(device: torch.device) -> str:
    """train.precision = "auto" on `device`: "bf16" where bfloat16 products are fast there, else "fp32"."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if step_ops.offers("bf16", device) else "fp32"


def fill(config: Config, speed: float, started: float, data: dict[str, TokenFile]) -> int:
    """The steps that fill what is left of the budget at `speed` tokens/s (less SPEED_MARGIN), the
    validation at every epoch's end included."""
    per_epoch, steps = steps_per_epoch(config, data), 1
    for _ in range(3):  # the epochs' validations depend on the steps: a fixed point, reached in two rounds
        validations = math.ceil(steps / per_epoch) - 1  # the last one is the final validation, already counted
        left = train_seconds(config, started, speed, data) - validations * validation_seconds(speed, data)
        steps = max(1, int(SPEED_MARGIN * speed * left / tokens_per_step(config)))
    return steps


def probe(config: Config, vocab_size: int, train: TokenFile, device: torch.device, steps: int = PROBE_STEPS) -> float:
    """Training tokens per second of `config`'s model here: `steps` timed steps (forward,
    backward, clipping, the optimizer) after PROBE_WARMUP untimed ones, on the split's first
    windows, from the median step's time (a slow step, the machine busy for a moment, moves it
    little). The probe's model is thrown away; the run's own is built afterwards from its seed."""
    tc = config.train
    model = LanguageModel(config.model, vocab_size).to(device)
    model.train()
    optimizer = make_optimizer(model, tc)
    forward = WindowForward(model)
    compute_dtype = torch.bfloat16 if tc.precision == "bf16" else None
    x, y = (t.to(device) for t in next(windows(*lazy_batchify(train.tokens, tc.batch_size, EOS_ID), tc.bptt)))
    state = model.init_state(tc.batch_size)
    times = []
    for step in range(PROBE_WARMUP + steps):
        sync(device)
        started = time.perf_counter()
        _, state = train_window(forward, tc, compute_dtype, x, y, detach_state(state))
        gradient_norm(model, tc.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        if step >= PROBE_WARMUP:
            times.append(time.perf_counter() - started)
    return y.numel() / max(1e-9, statistics.median(times))


def plan_for(config: Config, speed: float, probed, data: dict[str, TokenFile], started: float, *, sized: bool) -> Plan:
    """The Plan of `config` at `speed` tokens/s: its steps, and when it ends (every validation counted),
    no later than the budget plus the final validation."""
    steps = planned_steps(config, data)
    validations = math.ceil(steps / steps_per_epoch(config, data))  # one per epoch end, the last the final one
    run_s = steps * tokens_per_step(config) / max(speed, 1e-9) + (validations - 1) * validation_seconds(speed, data)
    if config.train.max_minutes:
        run_s = min(run_s, max(0.0, 60 * config.train.max_minutes - (time.perf_counter() - started)))
    finish_s = time.perf_counter() - started + run_s + validation_seconds(speed, data)
    return Plan(tokens_per_s=speed, probed=tuple(probed), steps=steps, epochs=steps / steps_per_epoch(config, data),
                finish_s=finish_s, sized=sized)


def useful_tokens(tokens: float, corpus_tokens: int) -> float:
    """What `tokens` training tokens over a corpus of `corpus_tokens` are worth: all of them within
    one pass; beyond it the corpus times 1 + ln(passes), each pass over seen text worth less than
    the one before (the shape of data-constrained scaling, Muennighoff et al. 2023)."""
    passes = tokens / max(1, corpus_tokens)
    return tokens if passes <= 1 else corpus_tokens * (1 + math.log(passes))


def train_seconds(config: Config, started: float, speed: float, data: dict[str, TokenFile]) -> float:
    """The budget's seconds left for training steps: what is not spent yet, less the final validation."""
    left = 60 * config.train.max_minutes - (time.perf_counter() - started)
    return max(0.0, left - validation_seconds(speed, data))


def validation_seconds(speed: float, data: dict[str, TokenFile]) -> float:
    """Expected seconds of one validation (and the checkpoint after it) at training speed `speed`."""
    return CHECKPOINT_S + VALIDATION_SHARE * len(data["valid"].tokens) / max(speed, 1e-9)


def tokens_per_step(config: Config) -> int:
    return config.train.batch_size * config.train.bptt


def steps_per_epoch(config: Config, data: dict[str, TokenFile]) -> int:
    return max(1, math.ceil(len(data["train"].tokens) // config.train.batch_size / config.train.bptt))


def planned_steps(config: Config, data: dict[str, TokenFile]) -> int:
    tc, per_epoch = config.train, steps_per_epoch(config, data)
    steps = tc.epochs * per_epoch if tc.epochs else tc.max_steps
    return min(steps, tc.max_steps) if tc.max_steps else steps


def replace(config: Config, section: str, **changes) -> Config:
    """`config` with `changes` in `section` ("model" or "train")."""
    return dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), **changes)})


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)

