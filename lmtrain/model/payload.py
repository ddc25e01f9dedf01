"""One schema check of a loaded checkpoint, run before anything uses it.

A checksum only proves that a file is whole, not that its author meant well: a checkpoint may
come from a stranger. So every reader (lmtrain.model.saved.load_run for evaluate, generate, bench and
compare; lmtrain.training.setup.resume_run for train --resume) passes what lmtrain.checkpoint.load_checkpoint
returns through `check_payload` before it builds a module, allocates or changes a file:

    required   config      a dict that lmtrain.config.from_dict accepts (plain values only)
               corpus      str: an absolute path or "builtin"
               tokenizer   {"kind": one of lmtrain.config.TOKENIZER_KINDS (the config's),
                            "model": sentencepiece bytes with exactly vocab_size pieces}
               vocab_size  int >= 3: the model's vocabulary
               model       str -> float32 tensors, finite: exactly the state_dict the config describes
               optimizer   {"state": dict, "param_groups": list of dicts}
               progress    dict: epoch (int >= 1), step (int >= 0)
    optional   corpus_digests  split name -> hex digest
               progress'   lr, valid_nll, best_valid_nll, averaging, at
    last.pt    resume      lmtrain.training.resume's entry: lmtrain.training.payload_resume checks every part

The expected shapes come from the config without building anything: first the config's sizes are
bounded by the values the checkpoint's weights really hold (a tensor that describes more values
than its storage has, by strides of 0, is refused), then every parameter's shape is computed
(model_shapes) and compared with the weights. So a 23 KB file whose config says hidden_size =
20000, layers = 10**6 or 2**63 - 1 is refused in milliseconds, where building the model took
gigabytes and a minute.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmtrain.config import TOKENIZER_KINDS, Config, ModelConfig, from_dict
from lmtrain.errors import LmtrainError
from lmtrain.model.cells import get_cell
from lmtrain.model.layer import layer_class, stack
from lmtrain.text import EOS, EOS_ID, UNK_ID, Tokenizer

REQUIRED = ("config", "corpus", "tokenizer", "vocab_size", "model", "optimizer", "progress")
PROGRESS_AT = ("epoch", "stop", "step")
INT64 = 2**63
MAX_DEPTH, MAX_VALUES = 16, 10_000_000  # lmtrain's own payloads nest 6 deep
WEIGHT_DTYPE = torch.float32


@dataclass
class Checked:
    """What the check built on the way: readers use these rather than building them again."""

    config: Config
    tokenizer: Tokenizer
    shapes: dict[str, tuple[int, ...]]  # the model's state_dict shapes, by key (model_shapes)

    @property
    def parameter_shapes(self) -> list[tuple[int, ...]]:
        """The shapes of model.parameters(), in its order."""
        return [self.shapes[k] for k in parameter_keys(self.config.model, self.shapes)]


class Fields:
    """Raises one line naming the file and the field: 'RUN/best.pt: field model['x'] has ...'."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, message: str) -> None:
        raise LmtrainError(f"{self.path}: {message}")

    def field(self, name: str, problem: str) -> None:
        self.fail(f"field {name} {problem}")

    def dict(self, name: str, value: Any, keys: tuple[str, ...] = ()) -> dict:
        if not isinstance(value, dict):
            self.field(name, f"must be a dict, got {show(value)}")
        for key in keys:
            if key not in value:
                self.field(name, f"has no key '{key}'")
        return value

    def int(self, name: str, value: Any, low: int = 0, high: int = INT64 - 1) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            self.field(name, f"must be an integer, got {show(value)}")
        if not low <= value <= high:
            self.field(name, f"= {show(value)} is out of range (at least {low:,}, at most {high:,})")
        return value

    def number(self, name: str, value: Any, low: float = -math.inf, allow_inf: bool = False) -> float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            self.field(name, f"must be a number, got {show(value)}")
        if isinstance(value, int):
            value = float(self.int(name, value, -INT64))
        if math.isnan(value) or (math.isinf(value) and not allow_inf) or value < low:
            self.field(name, f"= {value} is out of range" + (f" (at least {low:g})" if low > -math.inf else ""))
        return value


def show(value: Any) -> str:
    """A short, safe description of a value from the file: no deep repr, no 10,000-digit number."""
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        return f"{value:,}" if value.bit_length() <= 64 else f"an integer of {value.bit_length():,} bits"
    if isinstance(value, str):
        return repr(value[:40] + ("..." if len(value) > 40 else ""))
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor of shape {tuple(value.shape)}"
    if isinstance(value, (dict, list, tuple, bytes)):
        return f"a {type(value).__name__} of {len(value):,} items"
    return f"a {type(value).__name__}"


def check_payload(path: Path, payload: dict[str, Any]) -> Checked:
    """Check every key of `payload` (lmtrain.checkpoint.load_checkpoint's) before any use; last.pt's
    resume entry is lmtrain.training.payload_resume.check_resume_payload's, which begins with this.

    Raises LmtrainError with one line naming `path` and the field. Returns the checked config, the
    tokenizer and the model's shapes."""
    f = Fields(path)
    for key in REQUIRED:
        if key not in payload:
            f.fail(f"the checkpoint has no '{key}' field")
    check_tensors(f, payload)
    if not isinstance(payload["corpus"], str) or not payload["corpus"]:
        f.field("corpus", f"must be a non-empty str, got {show(payload['corpus'])}")
    if "corpus_digests" in payload:
        for split, digest in f.dict("corpus_digests", payload["corpus_digests"]).items():
            if not isinstance(split, str) or not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{16,128}", digest):
                f.field(f"corpus_digests[{show(split)}]", f"must be a hex digest, got {show(digest)}")
    weights = check_weight_dict(f, "model", payload["model"])
    held = stored_values(weights)
    vocab_size = f.int("vocab_size", payload["vocab_size"], 3, held)  # <unk>, <eos> and a piece at least
    config = check_config(f, payload["config"], vocab_size, len(weights), held)
    shapes = model_shapes(config.model, vocab_size)
    check_state_dict(f, "model", weights, shapes)
    check_parameter_count(f, config, shapes, held)  # after the shapes: tensors sharing one storage
    tokenizer = check_tokenizer(f, payload["tokenizer"], vocab_size, config)
    check_progress(f, payload["progress"])
    optimizer = f.dict("optimizer", payload["optimizer"], ("state", "param_groups"))
    f.dict("optimizer['state']", optimizer["state"])
    if not isinstance(optimizer["param_groups"], list) or not all(isinstance(g, dict) for g in optimizer["param_groups"]):
        f.field("optimizer['param_groups']", f"must be a list of dicts, got {show(optimizer['param_groups'])}")
    return Checked(config, tokenizer, shapes)


def check_tensors(f: Fields, payload: dict[str, Any]) -> None:
    """Every tensor anywhere in the payload is a plain dense one on the CPU whose storage holds
    every value it describes: torch.load rebuilds a tensor of any shape over a storage of one value
    (a stride of 0), and the first copy of it would allocate the whole shape. Iterative, so that a
    list nested 100,000 deep is refused rather than overflowing the stack."""
    stack = [("", payload, 0)]
    seen = 0
    while stack:
        where, value, depth = stack.pop()
        seen += 1
        if seen > MAX_VALUES or depth > MAX_DEPTH:
            f.fail("the checkpoint's values are nested too deeply or are too many to be an lmtrain checkpoint")
        if isinstance(value, dict):  # reversed: the first bad value in the file's order is the one named
            stack.extend(reversed([(f"{where}[{show(k)}]", v, depth + 1) for k, v in value.items()]))
        elif isinstance(value, (list, tuple)):
            stack.extend(reversed([(f"{where}[{i}]", v, depth + 1) for i, v in enumerate(value)]))
        elif isinstance(value, torch.Tensor):
            if value.layout != torch.strided or value.device.type != "cpu" or value.is_quantized:
                f.field(field_name(where), f"is a {value.layout} tensor on {value.device}: only dense CPU tensors are read")
            if not value.is_contiguous() or value.numel() > value.untyped_storage().nbytes() // value.element_size():
                f.field(field_name(where), f"is a tensor of shape {tuple(value.shape)} over a storage of "
                        f"{value.untyped_storage().nbytes():,} bytes: it describes values the file does not hold")


def field_name(where: str) -> str:
    """"['model']['decoder.weight']" -> "model['decoder.weight']"."""
    head, _, rest = where[1:].partition("]")
    return head.strip("'") + rest


def check_weight_dict(f: Fields, name: str, value: Any) -> dict[str, torch.Tensor]:
    f.dict(name, value)
    for key, tensor in value.items():
        if not isinstance(key, str) or not isinstance(tensor, torch.Tensor):
            f.field(f"{name}[{show(key)}]", f"must be a tensor under a str key, got {show(tensor)}")
    return value


def stored_values(weights: dict[str, torch.Tensor]) -> int:
    """How many values the tensors' storages really hold, each storage counted once (tied weights
    share one): a bound on the parameters that the weights can describe."""
    storages = {}
    for t in weights.values():
        storage = t.untyped_storage()
        storages[(storage.data_ptr(), storage.nbytes())] = storage.nbytes() // max(1, t.element_size())
    return sum(storages.values())


def check_config(f: Fields, values: Any, vocab_size: int, tensors: int, held: int) -> Config:
    """The config as lmtrain.config.from_dict checks it, after the checks that keep from_dict and
    model_shapes cheap: plain values only (a deep list's repr would overflow), integers within
    int64, and the sizes no larger than the weights could describe."""
    f.dict("config", values)
    for section, table in values.items():
        if not isinstance(section, str):
            f.field("config", f"has a section that is not a str ({show(section)})")
        f.dict(f"config['{section}']", table)
        for key, value in table.items():
            name = f"config['{section}'][{show(key)}]"
            if not isinstance(key, str):
                f.field(f"config['{section}']", f"has a key that is not a str ({show(key)})")
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                continue  # model.cell, one name per layer
            if not isinstance(value, (bool, int, float, str)):
                f.field(name, f"must be a plain value, got {show(value)}")
            if isinstance(value, int) and not isinstance(value, bool):
                f.int(name, value, -INT64)
    model = values.get("model", {})
    # each layer holds at least two tensors (w_ih and b_ih; the qrnn has no more)
    bounds = {"layers": tensors // 2, "hidden_size": held, "embedding_size": held}
    for key, high in bounds.items():
        value = model.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > high:
            f.field(f"config['model']['{key}']", f"= {show(value)} describes a model larger than the checkpoint's "
                    f"weights ({tensors:,} tensors, {held:,} values in all): refusing it before building anything")
    try:
        config = from_dict(values)
    except LmtrainError as e:
        f.field("config", f"is not a valid config: {str(e)[:300]}")
    m = config.model
    sizes = (m.embedding_size, *m.layer_sizes)  # at most `tensors // 2` layers
    # the embedding, and each layer's W_hh (units x units) or, for a cell without one (qrnn), its
    # input weight (at least units x inputs)
    at_least = vocab_size * m.embedding_size + sum(
        units * (units if "w_hh" in layer_class(get_cell(name)).shapes(get_cell(name), inputs, units, m) else inputs)
        for name, inputs, units in zip(m.cells, sizes, sizes[1:]))
    if at_least > held:
        f.fail(f"the config describes a model of at least {at_least:,} parameters, but the checkpoint's weights hold "
               f"{held:,} values: they do not fit the model its config describes")
    return config


def model_shapes(config: ModelConfig, vocab_size: int) -> dict[str, tuple[int, ...]]:
    """The shape of every state_dict entry of LanguageModel(config, vocab_size), in its order,
    computed rather than built (building on the meta device first imports torch's reference ops,
    a second on a small machine); tests/test_crafted_checkpoints.py holds it to the real model."""
    shapes = {"embedding.weight": (vocab_size, config.embedding_size)}
    for i, (cell, inputs, units, below) in enumerate(stack(config)):
        layer = layer_class(cell).shapes(cell, inputs, units, config, below)
        shapes |= {f"layers.{i}.{key}": shape for key, shape in layer.items()}
    return shapes | {"decoder.weight": (vocab_size, config.layer_sizes[-1]), "decoder.bias": (vocab_size,)}


def state_widths(config: ModelConfig) -> list[dict[str, int]]:
    """Each layer's carried state by name, each tensor (B, width), as LanguageModel(config).init_state
    gives it (its layers' Layer.state_widths), computed rather than built."""
    sizes = (config.embedding_size, *config.layer_sizes)
    cells = [get_cell(name) for name in config.cells]
    return [layer_class(cell).state_widths(cell, sizes[i], sizes[i + 1], config) for i, cell in enumerate(cells)]


def parameter_keys(config: ModelConfig, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """The state_dict keys of model.parameters(), in its order (a tied decoder is the embedding)."""
    return [k for k in shapes if not (config.tie_weights and k == "decoder.weight")]


def check_parameter_count(f: Fields, config: Config, shapes: dict[str, tuple[int, ...]], held: int) -> None:
    """No more parameters than the weights' storages hold (each storage once), and memory to build them."""
    parameters = sum(math.prod(shapes[k]) for k in parameter_keys(config.model, shapes))
    if parameters > held:
        f.fail(f"the config describes a model of {parameters:,} parameters, but the checkpoint's weights hold "
               f"{held:,} values: they do not fit the model its config describes")
    check_memory(f, config, parameters, shapes["decoder.bias"][0])


def check_state_dict(f: Fields, name: str, weights: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> None:
    """Exactly the keys and shapes of the model's state_dict, float32 and finite values."""
    missing = [k for k in shapes if k not in weights]
    extra = [k for k in weights if k not in shapes]
    misfit = f"the weights do not fit the model its config describes: field {name}"
    if missing:
        f.fail(f"{misfit} has no {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if extra:
        f.fail(f"{misfit} has an unexpected {show(extra[0])}" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    for key, want in shapes.items():
        got = tuple(weights[key].shape)
        if got != want:
            f.fail(f"{misfit}[{key!r}] has shape {got}, the config gives {want}")
    check_floats(f, name, weights)


def check_floats(f: Fields, name: str, tensors: dict[Any, torch.Tensor]) -> None:
    for key, t in tensors.items():
        if t.dtype != WEIGHT_DTYPE:
            f.field(f"{name}[{key!r}]", f"holds {str(t.dtype).removeprefix('torch.')} values, not float32 weights")
        if not bool(torch.isfinite(t).all()):
            f.field(f"{name}[{key!r}]", "holds NaN or infinite values")


def available_memory() -> int | None:
    """Bytes this machine can still give (Linux's MemAvailable), or None where it is unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_memory(f: Fields, config: Config, parameters: int, vocab_size: int) -> None:
    """The model's parameters (built beside the loaded weights) and one evaluation window at the
    config's train.eval_batch_size (its logits, T x B x V, and the carried state, B x the layers'
    state units), 4 bytes a value, must fit in the memory this machine has free: a config whose
    batch could never be evaluated is refused here rather than after gigabytes. A batch given on
    the command line is the command's to bound."""
    tc, m = config.train, config.model
    state_units = sum(sum(layer.values()) for layer in state_widths(m))
    window = tc.eval_batch_size * (tc.bptt * vocab_size + state_units)
    needed = 4 * (parameters + window)
    free = available_memory()
    if free is not None and needed > free:
        f.fail(f"its model ({parameters:,} parameters) and one evaluation window of train.eval_batch_size "
               f"{tc.eval_batch_size:,} x train.bptt {tc.bptt:,} need {needed / 2**30:,.1f} GiB, and this machine has "
               f"{free / 2**30:,.1f} GiB free")


def check_tokenizer(f: Fields, value: Any, vocab_size: int, config: Config) -> Tokenizer:
    """A sentencepiece model of the config's kind with exactly `vocab_size` pieces, <unk> and <eos>
    where lmtrain puts them. Fewer pieces than the model's vocabulary give a wrong perplexity (the
    softmax spreads over ids no text has) and make `generate` draw ids it cannot decode."""
    f.dict("tokenizer", value, ("kind", "model"))
    kind, proto = value["kind"], value["model"]
    if kind not in TOKENIZER_KINDS:
        f.field("tokenizer['kind']", f"= {show(kind)} is not a tokenizer kind (known: {', '.join(TOKENIZER_KINDS)})")
    if kind != config.tokenizer.kind:
        f.field("tokenizer['kind']", f"= {show(kind)}, but the config gives tokenizer.kind = '{config.tokenizer.kind}'")
    if not isinstance(proto, bytes) or not proto:
        f.field("tokenizer['model']", f"must be the sentencepiece model's bytes, got {show(proto)}")
    try:
        tokenizer = Tokenizer(proto, kind)
    except (RuntimeError, ValueError, TypeError) as e:
        f.field("tokenizer['model']", f"is not a sentencepiece model ({str(e).strip().splitlines()[0][-100:]})")
    pieces = tokenizer.vocab_size
    if pieces != vocab_size:
        f.field("tokenizer['model']", f"has {pieces:,} pieces, but vocab_size (the model's vocabulary) is {vocab_size:,}: "
                "the tokenizer is not the one this model was trained with")
    if not tokenizer.sp.is_unknown(UNK_ID) or tokenizer.sp.id_to_piece(EOS_ID) != EOS:
        f.field("tokenizer['model']", f"does not have <unk> as id {UNK_ID} and {EOS} as id {EOS_ID}, as lmtrain's do")
    return tokenizer


def check_progress(f: Fields, value: Any) -> None:
    """The fields readers use (epoch, step; `at` decides resume's best.pt), typed and in range."""
    progress = f.dict("progress", value, ("epoch", "step"))
    f.int("progress['epoch']", progress["epoch"], 1)
    f.int("progress['step']", progress["step"], 0)
    for key, allow_inf in (("lr", False), ("best_valid_nll", True)):
        if key in progress:
            f.number(f"progress['{key}']", progress[key], allow_inf=allow_inf)
    if progress.get("valid_nll") is not None:
        f.number("progress['valid_nll']", progress["valid_nll"], allow_inf=True)
    if "averaging" in progress and not isinstance(progress["averaging"], bool):
        f.field("progress['averaging']", f"must be true or false, got {show(progress['averaging'])}")
    if "at" in progress and progress["at"] not in PROGRESS_AT:
        f.field("progress['at']", f"must be one of {', '.join(PROGRESS_AT)}, got {show(progress['at'])}")
