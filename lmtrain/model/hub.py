"""A trained model as a directory in the form model hubs use (`lmtrain export --format
safetensors`), and back (lmtrain.model.saved.read_saved reads it like a run directory):

    DIR/model.safetensors   the weights (the safetensors format: tensors and a JSON header, no
                            pickle, so a file from a stranger runs no code when opened)
    DIR/config.json         {"format": "lmtrain-safetensors", "version": 1, "config": lmtrain's
                            config, "vocab_size", "tokenizer_kind", "corpus", "progress"}
    DIR/tokenizer.model     the sentencepiece model

Reading rebuilds the checkpoint's payload from the three files and passes it through the same
check_payload as every checkpoint, so a damaged or hostile directory is refused the same way.
The `safetensors` package is the `export` extra.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmtrain.config import to_dict
from lmtrain.errors import LmtrainError

if TYPE_CHECKING:
    from lmtrain.model.saved import Saved

FORMAT = "lmtrain-safetensors"
VERSION = 1
WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.model"


def safetensors_torch():
    try:
        import safetensors.torch
    except ImportError as e:
        raise LmtrainError("the safetensors format needs the safetensors package: pip install 'lmtrain[export]'") from e
    return safetensors.torch


def is_export(path: Path) -> bool:
    """Whether `path` is a directory in this form (its config.json names the format)."""
    return path.is_dir() and (path / CONFIG).is_file() and (path / WEIGHTS).exists()


def write_files(saved: Saved, directory: Path) -> None:
    """A read (and checked) model into `directory` (which exists and is empty)."""
    weights = {k: v.detach().clone().contiguous() for k, v in saved.weights.items()}  # tied tensors apart
    safetensors_torch().save_file(weights, str(directory / WEIGHTS))
    progress = {k: saved.progress[k] for k in ("epoch", "step") if k in saved.progress}
    meta = {"format": FORMAT, "version": VERSION, "config": to_dict(saved.config), "vocab_size": saved.vocab_size,
            "tokenizer_kind": saved.config.tokenizer.kind, "corpus": saved.corpus, "progress": progress}
    (directory / CONFIG).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    (directory / TOKENIZER).write_bytes(saved.tokenizer.model_proto)


def read_payload(directory: Path) -> tuple[Path, dict[str, Any]]:
    """The directory's files as a checkpoint payload (for check_payload) and the weights' path."""
    weights_path = directory / WEIGHTS
    try:
        meta = json.loads((directory / CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LmtrainError(f"{directory / CONFIG}: not readable JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise LmtrainError(f"{directory / CONFIG}: not an lmtrain export (format {FORMAT}, version {VERSION})")
    try:
        weights = safetensors_torch().load_file(str(weights_path))
        tokenizer = (directory / TOKENIZER).read_bytes()
    except LmtrainError:
        raise
    except Exception as e:  # noqa: BLE001  a damaged file, whatever the library raises
        raise LmtrainError(f"{directory}: cannot read its weights or tokenizer ({str(e).strip().splitlines()[0][:160]})") from None
    payload = {"config": meta.get("config"), "vocab_size": meta.get("vocab_size"), "corpus": meta.get("corpus"),
               "tokenizer": {"kind": meta.get("tokenizer_kind"), "model": tokenizer}, "model": weights,
               "optimizer": {"state": {}, "param_groups": []}, "progress": meta.get("progress")}
    return weights_path, payload

