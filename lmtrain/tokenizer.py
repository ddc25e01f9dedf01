"""The sentencepiece wrapper: train on the training split, encode lines to ids, decode ids to text.

Ids 0 and 1 are always `<unk>` and `<eos>`; every encoded line ends with `<eos>`.

Word mode reproduces the published word-level setups (PTB: 10,000 types, WikiText-2: 33,278):
sentencepiece's `word` model collects the vocabulary, the corpus' literal `<unk>` is left out of
it so that it maps to the unknown id, and encoding looks each whitespace-separated word up on its
own. (sentencepiece's own encoder merges a run of unknown words into one id, which would change
the token count and so every perplexity.)
"""

from __future__ import annotations

import io
from collections.abc import Iterable

import numpy as np
import sentencepiece as spm

from lmtrain.errors import LmtrainError

UNK_ID, EOS_ID = 0, 1
UNK, EOS = "<unk>", "<eos>"
WORD_PREFIX = "\u2581"  # sentencepiece's visible space


class Tokenizer:
    """A trained sentencepiece model plus the kind it was trained as."""

    def __init__(self, model_proto: bytes, kind: str):
        self.model_proto = model_proto
        self.kind = kind
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode_lines(self, lines: list[str]) -> np.ndarray:
        """Ids of `lines`, each line followed by `<eos>`; shape (tokens,), int64."""
        if self.kind == "word":
            pieces = [[WORD_PREFIX + w for w in line.split()] for line in lines]
            per_line = [self.sp.piece_to_id(p) if p else [] for p in pieces]
        else:
            per_line = self.sp.encode(lines, num_threads=2)
        lengths = np.fromiter((len(ids) + 1 for ids in per_line), dtype=np.int64, count=len(per_line))
        out = np.full(int(lengths.sum()), EOS_ID, dtype=np.int64)
        starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
        for start, ids in zip(starts, per_line):
            out[start : start + len(ids)] = ids
        return out

    def encode_prompt(self, text: str) -> list[int]:
        """Ids of a prompt: its lines, each but the last ended by `<eos>` (the last stays open)."""
        lines = text.split("\n")
        ids = self.encode_lines(lines).tolist()
        return ids[:-1]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.token_text(i) for i in ids)

    def token_text(self, token_id: int) -> str:
        """The text of one id, so samples can be printed as they are drawn."""
        if token_id == EOS_ID:
            return "\n"
        if token_id == UNK_ID:
            return " " + UNK if self.kind == "word" else UNK
        return self.sp.id_to_piece(token_id).replace(WORD_PREFIX, " ")


def train_tokenizer(lines: list[str], kind: str, vocab_size: int) -> Tokenizer:
    """Train a sentencepiece model of `kind` on `lines` (the training split)."""
    if kind == "word":
        # the corpus' own <unk> marks out-of-vocabulary words: keep it out of the vocabulary
        lines = [" ".join(w for w in line.split() if w != UNK) for line in lines]
    lines = [line for line in lines if line.strip()]
    if not lines:
        raise LmtrainError("the training split holds no text to train a tokenizer on")
    options = dict(
        model_type=kind,
        vocab_size=vocab_size,
        hard_vocab_limit=False,  # a small corpus may not fill vocab_size: use what it has
        unk_id=UNK_ID,
        eos_id=EOS_ID,
        bos_id=-1,
        pad_id=-1,
        unk_piece=UNK,
        eos_piece=EOS,
        normalization_rule_name="identity",  # bits per byte are only honest on the bytes as given
        remove_extra_whitespaces=kind == "word",  # keep indentation in subword and char modes
        add_dummy_prefix=kind == "word",  # so subword text decodes back byte for byte, piece by piece
        allow_whitespace_only_pieces=True,
        character_coverage=1.0 if kind in ("char", "word") else 0.9995,
        max_sentence_length=1 << 24,
        max_sentencepiece_length=512 if kind == "word" else 16,
        input_sentence_size=2_000_000,
        shuffle_input_sentence=True,
        num_threads=2,
        minloglevel=2,
    )
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, **options)
    except RuntimeError as e:
        reason = str(e).split("]")[-1].strip() or str(e)
        raise LmtrainError(f"sentencepiece could not train a {kind} tokenizer with vocab_size {vocab_size}: {reason}") from None
    return Tokenizer(model.getvalue(), kind)
