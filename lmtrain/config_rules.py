"""The values a config may take: the choices of each named key, the integer bounds, and the
range checks across keys that the field types alone do not express.

`lmtrain.config` checks every value it reads with these; the dataclasses and their defaults live there.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

from lmtrain.errors import LmtrainError

if TYPE_CHECKING:
    from lmtrain.config import Config

TOKENIZER_KINDS = ("bpe", "unigram", "char", "word")
CELLS = ("lstm", "peephole", "coupled", "gru", "rnn", "slstm", "mogrifier", "qrnn", "dglstm", "clockwork")
# the cells whose state is h alone (their modules' STATE; tests/test_zoneout.py holds the two
# together): model.zoneout_cell has no c to act on there
H_ONLY_CELLS = ("gru", "rnn", "clockwork")
OPTIMIZERS = ("sgd", "ntasgd", "adamw")
LR_SCHEDULES = ("plateau", "epoch", "cosine", "constant")
# training arithmetic (train.precision; auto: bf16 where this device multiplies in bfloat16 fast, fp32 elsewhere,
# lmtrain.training.autosize.training_precision); generation weights: generation.WEIGHT_PRECISIONS
PRECISIONS = ("auto", "fp32", "bf16")
RECURRENT_INITS = ("range", "torch")
LOSS_REDUCTIONS = ("token_mean", "sequence_sum")
DEVICES = ("auto", "cpu", "cuda")
STACKS = ("layers", "grid")
SIZES = ("auto", "fixed")  # model.size (lmtrain.training.autosize)

# every integer key fits TOML's own range, a signed 64-bit integer, which is also what torch and
# numpy take (a larger seed or size was a traceback from deep inside them)
MAX_INT = 2**63 - 1
# sizes beyond these are typing mistakes, not models: no machine holds a layer of 2^20 units or a
# vocabulary of 2^24 pieces. Sizes below them can still ask for more memory than there is; the
# estimate in lmtrain.training.preflight refuses those before anything is built
UPPER_BOUNDS = {
    "tokenizer.vocab_size": 1 << 24,
    "model.layers": 1024,
    "model.embedding_size": 1 << 20,
    "model.hidden_size": 1 << 20,
    "train.batch_size": 1 << 20,
    "train.eval_batch_size": 1 << 20,
    "train.bptt": 1 << 20,
    "model.mogrifier_rounds": 1024,
    "model.mogrifier_rank": 1 << 20,
    "model.attention_window": 1 << 16,
}

# the clockwork cell keeps its step counter modulo the periods' least common multiple, in the
# state's float: exact up to 2^24 in float32
MAX_CLOCKWORK_CYCLE = 1 << 24


def check_bounds(section: str, key: str, value: Any) -> None:
    """A float must be finite (TOML reads nan and inf) and an integer within the key's upper bound;
    checked per value, so that an error can name the file the value came from."""
    if isinstance(value, float) and not math.isfinite(value):
        raise LmtrainError(f"config key '{section}.{key}' must be a finite number, got {value}")
    limit = UPPER_BOUNDS.get(f"{section}.{key}", MAX_INT)
    if isinstance(value, int) and not isinstance(value, bool) and value > limit:
        raise LmtrainError(f"config key '{section}.{key}' must be at most {limit:,}, got {value:,}")


def validate(config: Config) -> None:
    """Range and choice checks that the types alone do not express."""
    t, m, tr = config.tokenizer, config.model, config.train
    for section, table in dataclasses.asdict(config).items():  # a Config built in code, not through check_value
        for key, value in table.items():
            check_bounds(section, key, value)
    choices = [
        ("tokenizer.kind", t.kind, TOKENIZER_KINDS),
        *(("model.cell", name, CELLS) for name in m.cell.split(",")),
        ("train.optimizer", tr.optimizer, OPTIMIZERS),
        ("train.lr_schedule", tr.lr_schedule, LR_SCHEDULES),
        ("train.loss_reduction", tr.loss_reduction, LOSS_REDUCTIONS),
        ("train.device", tr.device, DEVICES),
        ("train.precision", tr.precision, PRECISIONS),
        ("model.recurrent_init", m.recurrent_init, RECURRENT_INITS),
        ("model.stack", m.stack, STACKS),
        ("model.size", m.size, SIZES),
    ]
    for key, value, allowed in choices:
        if value not in allowed:
            raise LmtrainError(f"config key '{key}' must be one of {', '.join(allowed)}, got '{value}'")
    positive = [
        ("tokenizer.vocab_size", t.vocab_size),
        ("model.layers", m.layers),
        ("model.embedding_size", m.embedding_size),
        ("model.hidden_size", m.hidden_size),
        ("train.batch_size", tr.batch_size),
        ("train.eval_batch_size", tr.eval_batch_size),
        ("train.bptt", tr.bptt),
        ("train.lr", tr.lr),
        ("train.lr_decay", tr.lr_decay),
        ("train.log_interval", tr.log_interval),
        ("train.nonmono", tr.nonmono),
        ("model.spectral_radius", m.spectral_radius),
    ]
    for key, value in positive:
        if value <= 0:
            raise LmtrainError(f"config key '{key}' must be positive, got {value}")
    non_negative = [
        ("train.epochs", tr.epochs),
        ("train.max_steps", tr.max_steps),
        ("train.max_minutes", tr.max_minutes),
        ("train.clip", tr.clip),
        ("train.weight_decay", tr.weight_decay),
        ("train.lr_decay_start", tr.lr_decay_start),
        ("train.warmup_steps", tr.warmup_steps),
        ("train.ar", tr.ar),
        ("train.tar", tr.tar),
        ("model.init_range", m.init_range),
        ("model.mogrifier_rounds", m.mogrifier_rounds),
        ("model.mogrifier_rank", m.mogrifier_rank),
        ("model.attention_window", m.attention_window),
        ("train.seed", tr.seed),  # numpy's generators take no negative seed
        ("train.checkpoint_every", tr.checkpoint_every),
        ("train.max_bad_steps", tr.max_bad_steps),
    ]
    for key, value in non_negative:
        if value < 0:
            raise LmtrainError(f"config key '{key}' must not be negative, got {value}")
    if len(m.cells) != m.layers:
        raise LmtrainError(
            f"config key 'model.cell' names {len(m.cells)} cells for {m.layers} layers "
            f"(give one name for all layers or one per layer)"
        )
    if m.reservoir and any(name != "rnn" for name in m.cells):
        raise LmtrainError(f"config key 'model.reservoir' is for model.cell = rnn only (a fixed random recurrence), got '{m.cell}'")
    check_grid(m)
    if m.attention_window and m.layer_sizes[-1] % 2:
        raise LmtrainError(f"config key 'model.attention_window' splits the top layer's output into key and value halves: "
                           f"its units ({'model.embedding_size, with model.tie_weights' if m.tie_weights else 'model.hidden_size'}) "
                           f"must be even, got {m.layer_sizes[-1]}")
    if m.qrnn_window not in (1, 2):
        raise LmtrainError(f"config key 'model.qrnn_window' must be 1 or 2, got {m.qrnn_window}")
    check_periods(m)
    if tr.epochs == 0 and tr.max_steps == 0:
        raise LmtrainError("config keys 'train.epochs' and 'train.max_steps' are both 0: nothing to train")
    for key in ("dropout", "embedding_dropout", "weight_drop", "zoneout_hidden", "zoneout_cell"):
        value = getattr(m, key)
        if not 0.0 <= value < 1.0:
            raise LmtrainError(f"config key 'model.{key}' must be in [0, 1), got {value}")
    without_c = sorted({name for name in m.cells if name in H_ONLY_CELLS})
    if m.zoneout_cell and without_c:
        which = f"the {without_c[0]} cell has" if len(without_c) == 1 else f"the {', '.join(without_c)} cells have"
        raise LmtrainError(f"config key 'model.zoneout_cell' needs a cell with a c state; {which} only h (use model.zoneout_hidden)")
    for key in ("dropout_input", "dropout_hidden", "dropout_output"):
        value = getattr(m, key)
        if value >= 1.0:
            raise LmtrainError(f"config key 'model.{key}' must be below 1 (negative: model.dropout), got {value}")
    if tr.lr_decay < 1:
        raise LmtrainError(f"config key 'train.lr_decay' must be at least 1 (the lr is divided by it), got {tr.lr_decay}")
    if t.vocab_size < 3:
        raise LmtrainError(f"config key 'tokenizer.vocab_size' must be at least 3, got {t.vocab_size}")
    if t.sample_lines <= 100:  # sentencepiece's own lower limit
        raise LmtrainError(f"config key 'tokenizer.sample_lines' must be more than 100, got {t.sample_lines}")
    if tr.lr_schedule in ("plateau", "epoch") and tr.optimizer == "ntasgd":
        raise LmtrainError(f"train.optimizer ntasgd averages at a fixed rate: use train.lr_schedule constant, not {tr.lr_schedule}")


def check_grid(m) -> None:
    """model.stack = grid and model.grid_tied: LSTM layers, equally wide (each passes its depth memory
    to the next unit by unit), and for tying the embedding as wide as them (m: a ModelConfig)."""
    if m.grid_tied and m.stack != "grid":
        raise LmtrainError(f"config key 'model.grid_tied' is for model.stack = grid, got model.stack = '{m.stack}'")
    if m.stack != "grid":
        return
    if any(name != "lstm" for name in m.cells):
        raise LmtrainError(f"config key 'model.stack' = grid is a stack of LSTM blocks: it takes model.cell = lstm, got '{m.cell}'")
    if len(set(m.layer_sizes)) > 1:
        raise LmtrainError(f"config key 'model.stack' = grid needs equally wide layers, got {', '.join(map(str, m.layer_sizes))} "
                           f"(model.tie_weights gives the last layer model.embedding_size units: make it model.hidden_size)")
    if m.grid_tied and m.embedding_size != m.hidden_size:
        raise LmtrainError(f"config key 'model.grid_tied' shares the first layer's weights with every layer: it needs "
                           f"model.embedding_size = model.hidden_size, got {m.embedding_size} and {m.hidden_size}")


def check_periods(m) -> None:
    """model.clockwork_periods (m a ModelConfig): positive integers, non-decreasing, their cycle
    within MAX_CLOCKWORK_CYCLE, and no more modules than each clockwork layer has units."""
    key, text = "model.clockwork_periods", m.clockwork_periods
    if not all(p.isascii() and p.isdigit() and int(p) > 0 for p in text.split(",")):
        raise LmtrainError(f"config key '{key}' must be positive integers, comma-separated (1,2,4,8), got '{text}'")
    periods = m.periods
    if list(periods) != sorted(periods):
        raise LmtrainError(f"config key '{key}' must be in non-decreasing order (modules sorted by period), got '{text}'")
    if math.lcm(*periods) > MAX_CLOCKWORK_CYCLE:
        raise LmtrainError(f"config key '{key}': the periods' least common multiple must be at most "
                           f"{MAX_CLOCKWORK_CYCLE:,} (the step counter is kept modulo it), got {math.lcm(*periods):,}")
    names = ["model.hidden_size"] * m.layers
    if m.tie_weights:
        names[-1] = "model.embedding_size (the tied last layer's units)"
    for name, units, cell in zip(names, m.layer_sizes, m.cells):
        if cell == "clockwork" and units < len(periods):
            raise LmtrainError(f"config key '{key}' gives {len(periods)} modules, more than a clockwork layer's "
                               f"units: {name} is {units}")
