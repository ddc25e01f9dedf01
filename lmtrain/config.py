"""Run configuration: frozen dataclasses filled from defaults < TOML file < `--set` overrides.

Every default lives here and nowhere else. A TOML file has up to three tables, `[tokenizer]`,
`[model]` and `[train]`, whose keys are the fields below; an override is `section.key=value`
with a TOML value (`train.lr=0.5`, `model.tie_weights=true`) or a bare string
(`train.optimizer=adamw`). Unknown sections or keys and values of the wrong type raise
`LmtrainError` naming the key; the allowed values and ranges are in `lmtrain.config_rules`.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmtrain.config_rules import (  # the choices are named from here too: config.CELLS
    CELLS, DEVICES, LOSS_REDUCTIONS, LR_SCHEDULES, OPTIMIZERS, PRECISIONS, RECURRENT_INITS, SIZES, STACKS, TOKENIZER_KINDS,
    check_bounds, validate,
)
from lmtrain.errors import LmtrainError


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
    # auto: under a time budget (train.max_minutes, `--minutes`), the keys of the model's size, its
    # dropout and the run's length that the config does not give are chosen from the corpus's size
    # and this machine's measured speed (lmtrain.training.autosize); without a budget, and with
    # fixed, every key is as given (or defaulted) here
    size: str = "auto"
    # lstm | peephole | coupled | gru | rnn | slstm | mogrifier | qrnn | dglstm | clockwork for every layer, or one per layer:
    # `cell = ["lstm", "gru"]` in TOML, `--set model.cell=lstm,gru`; stored comma-joined ("lstm,gru").
    # A dglstm layer on a dglstm layer is depth-gated and must be as wide as it (docs/cells.md)
    cell: str = "lstm"
    layers: int = 2  # stacked recurrent layers
    embedding_size: int = 200  # width of the word embedding (the first layer's input)
    hidden_size: int = 200  # units of each recurrent layer (of the last one too, unless tie_weights)
    dropout: float = 0.2  # on the embedding output, between layers and before the decoder
    # the three places of model.dropout one by one (AWD-LSTM's dropouti, dropouth, dropout)
    dropout_input: float = -1.0  # dropout on the embedding output; negative: model.dropout
    dropout_hidden: float = -1.0  # dropout between layers; negative: model.dropout
    dropout_output: float = -1.0  # dropout before the decoder; negative: model.dropout
    # false: a fresh mask for every element (Zaremba et al. 2014); true: one mask per window and
    # stream, the same at every time step (variational / locked dropout, Gal & Ghahramani 2016)
    locked_dropout: bool = False
    embedding_dropout: float = 0.0  # drop whole words: rows of the embedding, one mask per window
    # DropConnect on every layer's W_hh, one mask per window (Wan et al. 2013); the qrnn, which has no
    # W_hh, drops from its gate filter W (as AWD-LSTM's WeightDrop did on its QRNN's linear weights)
    weight_drop: float = 0.0
    # zoneout (Krueger et al. 2017), in [0, 1): each unit of h keeps its previous value with this
    # probability at each step in training, the expectation at evaluation (docs/cells.md#zoneout)
    zoneout_hidden: float = 0.0
    zoneout_cell: float = 0.0  # the same for the cell's c (cells with a c state; slstm: c, n, m together)
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
    # the qrnn's convolution width over time (Bradbury et al. 2017), for every qrnn layer: 1, its
    # gates from x_t alone; 2, from x_{t-1} and x_t (AWD-LSTM's QRNN used 2 on its first layer, 1 above)
    qrnn_window: int = 1
    # an echo-state reservoir (Jaeger 2001), for model.cell = rnn only: every layer's W_ih, W_hh and
    # bias stay as drawn at init (fixed, not trained, but saved in checkpoints), W_hh scaled to
    # spectral radius model.spectral_radius; only the embedding and the decoder learn
    reservoir: bool = False
    spectral_radius: float = 0.9  # model.reservoir's largest |eigenvalue| of each W_hh (below 1: fading memory)
    # the clockwork cell's module periods T_i (Koutník et al. 2014), non-decreasing, comma-separated
    # (`[1, 2, 4, 8]` in TOML): g = as many modules, each H / g units, module i updating at the steps
    # t with t mod T_i = 0; the default is the paper's series 2^(i-1) for g = 4 (docs/cells.md)
    clockwork_periods: str = "1,2,4,8"
    # layers: each layer's cell on the one below; grid: a 2-D Grid LSTM (Kalchbrenner et al. 2015), depth
    # with an LSTM memory of its own beside time's, for model.cell = lstm and equally wide layers
    stack: str = "layers"
    grid_tied: bool = False  # model.stack = grid: every layer shares the first's weights (embedding as wide)
    # attention of the top layer's output over its previous K outputs, carried across windows, mixed
    # into the decoder's input (Daniluk et al. 2017's key-value form; docs/cells.md); 0: off
    attention_window: int = 0

    @property
    def cells(self) -> tuple[str, ...]:
        """The cell name of each layer."""
        names = tuple(self.cell.split(","))
        return names * self.layers if len(names) == 1 else names

    @property
    def periods(self) -> tuple[int, ...]:
        """model.clockwork_periods as integers (validated by config_rules.check_periods)."""
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
    optimizer: str = "adamw"
    nonmono: int = 5  # ntasgd's patience, in validation checks (epochs)
    lr: float = 0.003  # learning rate (the peak, after warm-up)
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
    # auto: bf16 where this device multiplies in bfloat16 fast (a CPU with AVX512-BF16 and our
    # compiled kernels, a CUDA GPU that supports it), fp32 elsewhere; a run's config.toml stores which.
    # fp32, or bf16 (mixed precision): every GEMM (the recurrences' and the decoder's) takes bfloat16
    # operands and sums in float32; the weights (the optimizer's master copy), their gradients, the
    # cell state, the gates' pointwise work and the loss stay float32. On CPUs with AVX512-BF16 the
    # LSTM runs our bfloat16 kernels; on CUDA, cuBLAS; elsewhere the rounding is emulated (same
    # results, no faster)
    precision: str = "auto"
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


def given_keys(path: Path | None = None, overrides: list[str] = ()) -> frozenset[str]:
    """The keys ("section.key") that a TOML file and `--set` overrides give, as `load_config` reads
    them (call it after load_config, which has checked both): model.size = "auto" leaves them be."""
    keys = {f"{section}.{key}" for section, table in (read_toml(path) if path is not None else {}).items()
            for key in table}
    return frozenset(keys | {item.partition("=")[0].strip() for item in overrides})


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


def join_cell_names(value: Any) -> Any:
    """`model.cell` as one comma-joined string: ["lstm", "gru"] and "lstm, gru" give "lstm,gru"."""
    if isinstance(value, list) and all(isinstance(name, str) for name in value):
        value = ",".join(value)
    if isinstance(value, str):
        value = ",".join(name.strip() for name in value.split(","))
    return value


def join_periods(value: Any) -> Any:
    """`model.clockwork_periods` as one comma-joined string: [1, 2, 4], "1, 2, 4" and 1 give "1,2,4" (or "1")."""
    number = lambda p: isinstance(p, (int, float)) and not isinstance(p, bool)  # noqa: E731
    if isinstance(value, list) and all(number(p) for p in value):  # TOML's [1, 2, 4]
        value = ",".join(str(p) for p in value)
    if number(value):  # one period, `--set model.clockwork_periods=1` (a float: check_periods's error)
        value = str(value)
    if isinstance(value, str):
        value = ",".join(p.strip() for p in value.split(","))
    return value


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)
