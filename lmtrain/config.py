"""Run configuration: frozen dataclasses filled from defaults < TOML file < `--set` overrides.

Every default lives here and nowhere else. A TOML file has up to three tables, `[tokenizer]`,
`[model]` and `[train]`, whose keys are the fields below; an override is `section.key=value`
with a TOML value (`train.lr=0.5`, `model.tie_weights=true`) or a bare string
(`train.optimizer=adamw`). Unknown sections or keys and values of the wrong type raise
`LmtrainError` naming the key.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmtrain.errors import LmtrainError

TOKENIZER_KINDS = ("bpe", "unigram", "char", "word")
CELLS = ("lstm", "peephole", "coupled", "gru", "rnn", "slstm", "mogrifier", "clockwork")
OPTIMIZERS = ("sgd", "ntasgd", "adamw")
LR_SCHEDULES = ("plateau", "epoch", "cosine", "constant")
PRECISIONS = ("fp32", "bf16")  # training arithmetic (train.precision); generation weights: generation.WEIGHT_PRECISIONS
RECURRENT_INITS = ("range", "torch")
LOSS_REDUCTIONS = ("token_mean", "sequence_sum")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class TokenizerConfig:
    kind: str = "bpe"  # bpe | unigram | char | word (whitespace-separated words)
    vocab_size: int = 4000  # bpe/unigram: exactly (a corpus that cannot give that many is an error); word/char: at most
    # the tokenizer trains on a uniform sample of at most this many lines of the training split,
    # so its memory is bounded whatever the corpus size (sentencepiece holds the sample, about
    # 2-3x its bytes). 2,000,000 was sentencepiece's input_sentence_size here before we sampled
    # ourselves, so tokenizers of corpora up to 2M lines (PTB, WikiText-2) are unchanged;
    # more lines than that add little to the statistics of a vocabulary of a few 10k pieces
    sample_lines: int = 2_000_000


@dataclass(frozen=True)
class ModelConfig:
    # lstm | peephole | coupled | gru | rnn | slstm | mogrifier | clockwork for every layer, or one per layer: `cell = ["lstm", "gru"]` in TOML,
    # `--set model.cell=lstm,gru`; stored comma-joined ("lstm,gru")
    cell: str = "lstm"
    layers: int = 2  # stacked recurrent layers
    embedding_size: int = 200  # width of the word embedding (the first layer's input)
    hidden_size: int = 200  # units of each recurrent layer (of the last one too, unless tie_weights)
    dropout: float = 0.0  # on the embedding output, between layers and before the decoder
    # the three places of model.dropout one by one (AWD-LSTM's dropouti, dropouth, dropout)
    dropout_input: float = -1.0  # dropout on the embedding output; negative: model.dropout
    dropout_hidden: float = -1.0  # dropout between layers; negative: model.dropout
    dropout_output: float = -1.0  # dropout before the decoder; negative: model.dropout
    # false: a fresh mask for every element (Zaremba et al. 2014); true: one mask per window and
    # stream, the same at every time step (variational / locked dropout, Gal & Ghahramani 2016)
    locked_dropout: bool = False
    embedding_dropout: float = 0.0  # drop whole words: rows of the embedding, one mask per window
    weight_drop: float = 0.0  # DropConnect on every layer's W_hh, one mask per window (Wan et al. 2013)
    # the decoder shares the embedding matrix; the last layer then has embedding_size units
    # (AWD-LSTM's layout), so hidden_size applies to the layers below it
    tie_weights: bool = False
    init_range: float = 0.1  # every parameter starts uniform in [-init_range, init_range] ...
    # ... except the recurrent layers' with "torch": uniform in ±1/sqrt(layer's units), PyTorch's default
    recurrent_init: str = "range"
    forget_bias: float = 0.0  # added to the forget gate's bias after init (cells with a forget gate)
    # the mogrifier cell's rounds before each LSTM step (Melis et al. 2020): odd ones gate the input
    # by the state, even ones the state by the input, each with a bias that starts at 0; 0 rounds
    # is the plain LSTM
    mogrifier_rounds: int = 5
    # the rank of each round's matrix: 0 full (I x H or H x I), k > 0 the product of an
    # (out x k) and a (k x in) factor, each drawn so that the product spreads as a full matrix would
    mogrifier_rank: int = 0
    # the clockwork cell's module periods (Koutník et al. 2014), comma-separated and non-decreasing
    # (`clockwork_periods = [1, 2, 4, 8]` in TOML, `--set model.clockwork_periods=1,2,4,8`): one
    # module per period, g in all, each H / g units wide (g must divide every clockwork layer's
    # units); module i updates only at the steps t with t mod T_i = 0. The default is the paper's
    # exponential series T_i = 2^(i-1) for g = 4 modules; write 1,2,4,...,2^(g-1) for other g
    clockwork_periods: str = "1,2,4,8"

    @property
    def cells(self) -> tuple[str, ...]:
        """The cell name of each layer."""
        names = tuple(self.cell.split(","))
        return names * self.layers if len(names) == 1 else names

    @property
    def periods(self) -> tuple[int, ...]:
        """model.clockwork_periods as integers (validated by `validate`)."""
        return tuple(int(p) for p in self.clockwork_periods.split(","))

    @property
    def layer_sizes(self) -> tuple[int, ...]:
        """Units of each layer: hidden_size, and embedding_size for the last one when tied."""
        sizes = [self.hidden_size] * self.layers
        if self.tie_weights:
            sizes[-1] = self.embedding_size
        return tuple(sizes)

    def dropouts(self) -> tuple[float, float, float]:
        """(input, hidden, output) dropout, each falling back to `dropout` when negative."""
        return tuple(self.dropout if p < 0 else p for p in (self.dropout_input, self.dropout_hidden, self.dropout_output))


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10  # passes over the training split
    max_steps: int = 0  # stop after this many optimizer steps in all (0: no limit)
    # wall-clock budget of the training (0: none): no epoch starts that the last one's duration
    # says would end past it, so training stops at an epoch's end, validated and checkpointed
    max_minutes: float = 0.0
    batch_size: int = 20  # parallel token streams
    eval_batch_size: int = 10  # parallel streams of validation
    bptt: int = 35  # tokens per truncated-BPTT window
    # sgd | ntasgd | adamw. ntasgd (Merity et al. 2017): SGD until validation has not improved on
    # the best of all but the last `nonmono` checks, then also average the weights from that step
    # on; validation and checkpoints then use the average
    optimizer: str = "sgd"
    nonmono: int = 5  # ntasgd's patience, in validation checks (epochs)
    lr: float = 1.0  # learning rate (the peak, after warm-up)
    # plateau: divide lr by lr_decay whenever validation does not improve;
    # epoch: lr = lr / lr_decay ** max(0, epoch - lr_decay_start) for epoch = 1, 2, ...;
    # cosine: from lr down to 0 over all steps, by step; constant: lr throughout
    lr_schedule: str = "plateau"
    lr_decay: float = 4.0  # the divisor of the plateau and epoch schedules
    lr_decay_start: int = 0  # the epoch schedule's first epoch without decay
    warmup_steps: int = 0  # lr rises linearly from 0 over these first steps, under any schedule
    weight_decay: float = 0.0  # L2 for sgd and ntasgd, decoupled for adamw
    # AWD-LSTM's variable-length BPTT: each window is bptt long with p 0.95 (else bptt / 2), then
    # drawn from N(that, 5), at least 5; the window's lr is scaled by its length / bptt
    variable_bptt: bool = False
    ar: float = 0.0  # activation regularisation: ar * mean(dropped last-layer output ** 2)
    tar: float = 0.0  # temporal AR: tar * mean((h_t - h_{t-1}) ** 2) on the last layer's output
    # fp32, or bf16 (mixed precision): every GEMM (the recurrences' and the decoder's) takes bfloat16
    # operands and sums in float32; the weights (the optimizer's master copy), their gradients, the
    # cell state, the gates' pointwise work and the loss stay float32. On CPUs with AVX512-BF16 the
    # LSTM runs our bfloat16 kernels; on CUDA, cuBLAS; elsewhere the rounding is emulated (same
    # results, no faster)
    precision: str = "fp32"
    # token_mean: the gradient of the mean loss per token (the PyTorch example's convention);
    # sequence_sum: summed over the window's steps, averaged over streams (Zaremba et al. 2014's),
    # i.e. bptt times larger, so their lr and clip values apply unchanged
    loss_reduction: str = "token_mean"
    clip: float = 0.25  # max global gradient norm (0: no clipping)
    seed: int = 1111  # every random generator of the run (python, numpy, torch, the window draws)
    device: str = "auto"  # auto | cpu | cuda
    # on CUDA, capture each window length's forward + backward as a CUDA graph and replay it
    # (lmtrain/training/graphs.py); falls back to eager if capture fails. Off with variable_bptt
    # (too many window lengths) and with several processes (DDP); ignored on the CPU
    cuda_graphs: bool = True
    log_interval: int = 100  # optimizer steps between progress records in metrics.jsonl
    # also write every metrics.jsonl record's numbers as TensorBoard scalars, in RUN/tensorboard/
    # (the `tensorboard` extra: pip install 'lmtrain[tensorboard]'); metrics.jsonl stays the record
    tensorboard: bool = False
    # optimizer steps between checkpoints (last.pt) within an epoch, each one a point that
    # `lmtrain train --resume` continues from exactly; 0: only at epoch ends. The demo model's
    # last.pt (19 MB with AdamW's state) took 0.18 s to write on 2 shared cores, where a step took
    # over 1 s: one write per 1000 steps costs far less than 1 % of a CPU run's time
    checkpoint_every: int = 1000
    # a step whose loss or gradient norm is not finite is skipped (no update) and counted in the
    # records' bad_steps; more than this many in a row stop the run (exit 2)
    max_bad_steps: int = 10


@dataclass(frozen=True)
class Config:
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


SECTIONS: dict[str, type] = {"tokenizer": TokenizerConfig, "model": ModelConfig, "train": TrainConfig}

# the keys `lmtrain train --resume RUN --set ...` may change: where training stops, nothing about
# how it trains, so that the resumed run is the run its config describes
RESUMABLE_KEYS = ("train.max_steps", "train.epochs", "train.max_minutes")

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
}


def load_config(path: Path | None = None, overrides: list[str] = (), base: Config | None = None) -> Config:
    """Resolve a Config from the defaults, an optional TOML file and `section.key=value` overrides.
    `base` stands in for the defaults (fine-tuning starts from the trained run's config)."""
    values: dict[str, dict[str, Any]] = to_dict(base) if base is not None else {name: {} for name in SECTIONS}
    if path is not None:
        for section, table in read_toml(path).items():
            if section not in SECTIONS:
                raise LmtrainError(f"{path}: unknown config section [{section}] (known: {', '.join(SECTIONS)})")
            if not isinstance(table, dict):
                raise LmtrainError(f"{path}: '{section}' must be a table [{section}]")
            for key, value in table.items():
                try:
                    values[section][key] = check_value(section, key, value)
                except LmtrainError as e:
                    raise LmtrainError(f"{path}: {e}") from None
    for item in overrides:
        section, key, value = parse_override(item)
        values[section][key] = value
    return from_dict(values)


def from_dict(values: dict[str, dict[str, Any]]) -> Config:
    """Build a Config from nested plain values (as stored in checkpoints), checking every key."""
    sections = {}
    for section, cls in SECTIONS.items():
        table = {key: check_value(section, key, value) for key, value in values.get(section, {}).items()}
        sections[section] = cls(**table)
    unknown = set(values) - set(SECTIONS)
    if unknown:
        raise LmtrainError(f"unknown config section '{sorted(unknown)[0]}'")
    config = Config(**sections)
    validate(config)
    return config


def to_dict(config: Config) -> dict[str, dict[str, Any]]:
    return dataclasses.asdict(config)


def to_toml(config: Config) -> str:
    """The resolved config as a TOML document that `load_config` reads back unchanged."""
    lines = []
    for section, table in to_dict(config).items():
        lines.append(f"[{section}]")
        for key, value in table.items():
            lines.append(f"{key} = {toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise LmtrainError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise LmtrainError(f"config path is a directory, not a TOML file: {path}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise LmtrainError(f"{path}: not valid TOML: {e}") from None
    except RecursionError:  # tomllib parses nested arrays and inline tables recursively
        raise LmtrainError(f"{path}: not valid TOML for lmtrain: its arrays or tables are nested too deeply") from None


def parse_override(item: str) -> tuple[str, str, Any]:
    """`train.lr=0.5` -> ("train", "lr", 0.5), typed by the field it sets."""
    name, sep, raw = item.partition("=")
    section, dot, key = name.strip().partition(".")
    if not sep or not dot or not key:
        raise LmtrainError(f"--set expects section.key=value, got '{item}'")
    field_type = field_types(section).get(key)
    if field_type is None:
        check_value(section, key, None)  # raises with the right message
    raw = raw.strip()
    if field_type is str:
        value: Any = raw.strip("'\"")
    else:
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        except RecursionError:
            raise LmtrainError(f"--set {section}.{key}: the value is nested too deeply") from None
    return section, key, check_value(section, key, value)


def field_types(section: str) -> dict[str, type]:
    cls = SECTIONS.get(section)
    if cls is None:
        raise LmtrainError(f"unknown config section '{section}' (known: {', '.join(SECTIONS)})")
    return {f.name: {"int": int, "float": float, "bool": bool, "str": str}[f.type] for f in dataclasses.fields(cls)}


def check_value(section: str, key: str, value: Any) -> Any:
    """Return `value` converted to the field's type, or raise naming `section.key`."""
    types = field_types(section)
    if key not in types:
        raise LmtrainError(f"unknown config key '{section}.{key}' (known in [{section}]: {', '.join(types)})")
    if (section, key) == ("model", "cell"):
        value = join_cell_names(value)
    if (section, key) == ("model", "clockwork_periods"):
        value = join_periods(value)
    want = types[key]
    ok = (
        (want is bool and isinstance(value, bool))
        or (want is int and isinstance(value, int) and not isinstance(value, bool))
        or (want is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (want is str and isinstance(value, str))
    )
    if not ok:
        raise LmtrainError(f"config key '{section}.{key}' must be {want.__name__}, got {value!r}")
    check_bounds(section, key, value)
    return float(value) if want is float else value


def check_bounds(section: str, key: str, value: Any) -> None:
    """A float must be finite (TOML reads nan and inf) and an integer within the key's upper bound;
    checked per value, so that an error can name the file the value came from."""
    if isinstance(value, float) and not math.isfinite(value):
        raise LmtrainError(f"config key '{section}.{key}' must be a finite number, got {value}")
    limit = UPPER_BOUNDS.get(f"{section}.{key}", MAX_INT)
    if isinstance(value, int) and not isinstance(value, bool) and value > limit:
        raise LmtrainError(f"config key '{section}.{key}' must be at most {limit:,}, got {value:,}")


def join_cell_names(value: Any) -> Any:
    """`model.cell` as one comma-joined string: ["lstm", "gru"] and "lstm, gru" give "lstm,gru"."""
    if isinstance(value, list) and all(isinstance(name, str) for name in value):
        value = ",".join(value)
    if isinstance(value, str):
        value = ",".join(name.strip() for name in value.split(","))
    return value


def join_periods(value: Any) -> Any:
    """`model.clockwork_periods` as one comma-joined string: [1, 2, 4] and "1, 2, 4" give "1,2,4"."""
    if isinstance(value, list) and all(isinstance(p, int) and not isinstance(p, bool) for p in value):
        value = ",".join(str(p) for p in value)
    if isinstance(value, int) and not isinstance(value, bool):  # one period: `--set model.clockwork_periods=1`
        value = str(value)
    if isinstance(value, str):
        value = ",".join(p.strip() for p in value.split(","))
    return value


# the clockwork cell keeps its step counter modulo the periods' least common multiple, in the
# state's float32: exact up to 2^24
MAX_CLOCKWORK_CYCLE = 1 << 24


def check_periods(m: ModelConfig) -> None:
    """model.clockwork_periods: positive integers, non-decreasing, their cycle within
    MAX_CLOCKWORK_CYCLE, and (where a layer is clockwork) as many modules as divide its units."""
    key, text = "model.clockwork_periods", m.clockwork_periods
    if not all(p.isascii() and p.isdigit() and int(p) > 0 for p in text.split(",")):
        raise LmtrainError(f"config key '{key}' must be positive integers, comma-separated (1,2,4,8), got '{text}'")
    periods = m.periods
    if list(periods) != sorted(periods):
        raise LmtrainError(f"config key '{key}' must be in non-decreasing order (modules sorted by period), got '{text}'")
    if math.lcm(*periods) > MAX_CLOCKWORK_CYCLE:
        raise LmtrainError(f"config key '{key}': the periods' least common multiple must be at most "
                           f"{MAX_CLOCKWORK_CYCLE:,} (the step counter is kept modulo it), got {math.lcm(*periods):,}")
    modules = len(periods)
    names = ["model.hidden_size"] * m.layers
    if m.tie_weights:
        names[-1] = "model.embedding_size (the tied last layer's units)"
    for name, units, cell in zip(names, m.layer_sizes, m.cells):
        if cell == "clockwork" and units % modules:
            raise LmtrainError(f"config key '{key}' gives {modules} modules, which must divide a clockwork layer's "
                               f"units: {name} is {units}")


def validate(config: Config) -> None:
    """Range and choice checks that the types alone do not express."""
    t, m, tr = config.tokenizer, config.model, config.train
    for section, table in to_dict(config).items():  # a Config built in code, not through check_value
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
    check_periods(m)
    if tr.epochs == 0 and tr.max_steps == 0:
        raise LmtrainError("config keys 'train.epochs' and 'train.max_steps' are both 0: nothing to train")
    for key in ("dropout", "embedding_dropout", "weight_drop"):
        value = getattr(m, key)
        if not 0.0 <= value < 1.0:
            raise LmtrainError(f"config key 'model.{key}' must be in [0, 1), got {value}")
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


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)
