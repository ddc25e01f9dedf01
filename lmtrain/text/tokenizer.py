"""The sentencepiece wrapper: train on a sample of the training split, encode lines to ids, decode ids to text.

Ids 0 and 1 are always `<unk>` and `<eos>`; every encoded line ends with `<eos>` (a line that
comes in pieces, see lmtrain.text.corpus, only after its last piece).

Training sees a uniform sample of at most `sample_lines` lines, drawn in one streaming pass
(`reservoir_sample`), so its memory is bounded whatever the corpus size; when the training split
has no more lines than that, the sample is all of them, in order, and the tokenizer is the one
sentencepiece trains on the whole split.

Word mode reproduces the published word-level setups (PTB: 10,000 types, WikiText-2: 33,278):
sentencepiece's `word` model collects the vocabulary, the corpus' literal `<unk>` is left out of
it so that it maps to the unknown id, and encoding looks each whitespace-separated word up on its
own. (sentencepiece's own encoder merges a run of unknown words into one id, which would change
the token count and so every perplexity.)
"""

from __future__ import annotations

import io
import itertools
import math
import random
import re
from collections.abc import Iterable, Sequence

import numpy as np
import sentencepiece as spm

from lmtrain.config import TokenizerConfig
from lmtrain.errors import LmtrainError

UNK_ID, EOS_ID = 0, 1
UNK, EOS = "<unk>", "<eos>"
WORD_PREFIX = "\u2581"  # sentencepiece's visible space
# the training sample's seed: fixed, not train.seed, so that runs differing only in their seed
# share one tokenizer (and their perplexities stay comparable)
SAMPLE_SEED = 0


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
        return self.encode_pieces(lines)

    def encode_pieces(self, pieces: list[str], continued: Sequence[int] = ()) -> np.ndarray:
        """Ids of `pieces`, each followed by `<eos>` but those listed in `continued` (pieces of a
        line that goes on in the next piece); shape (tokens,), int64. One thread: the
        parallelism is in the processes that call it (lmtrain.text.encode)."""
        if self.kind == "word":
            words = [[WORD_PREFIX + w for w in piece.split()] for piece in pieces]
            per_piece = [self.sp.piece_to_id(w) if w else [] for w in words]
        else:
            per_piece = self.sp.encode(pieces, num_threads=1)
        lengths = np.fromiter(map(len, per_piece), dtype=np.int64, count=len(per_piece))
        ids = np.fromiter(itertools.chain.from_iterable(per_piece), dtype=np.int64, count=int(lengths.sum()))
        line_ends = np.delete(np.cumsum(lengths), list(continued))
        return np.insert(ids, line_ends, EOS_ID)

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


def train_tokenizer(lines: Iterable[str], kind: str, vocab_size: int, sample_lines: int = TokenizerConfig.sample_lines,
                    seed: int = SAMPLE_SEED) -> Tokenizer:
    """Train a sentencepiece model of `kind` on a uniform sample of at most `sample_lines` of
    the non-blank `lines` (the training split, read once, in any size)."""
    if kind == "word":
        # the corpus' own <unk> marks out-of-vocabulary words: keep it out of the vocabulary
        lines = (" ".join(w for w in line.split() if w != UNK) for line in lines)
    lines = reservoir_sample(filter(str.strip, lines), sample_lines, seed)
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
        # the sample is drawn above, so sentencepiece takes it whole (and its own sampler, seeded
        # from the clock, never runs); the value is also what the model file records
        input_sentence_size=sample_lines,
        shuffle_input_sentence=True,
        num_threads=2,
        minloglevel=2,
    )
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, **options)
    except (RuntimeError, ValueError) as e:  # ValueError: a vocab_size beyond sentencepiece's int32
        raise LmtrainError(training_error(str(e), kind, vocab_size)) from None
    return Tokenizer(model.getvalue(), kind)


def training_error(message: str, kind: str, vocab_size: int) -> str:
    """sentencepiece's reason for not training, as one line that says what to change."""
    too_small = re.search(r"smaller than required_chars\. \d+ vs (\d+)", message)
    if too_small:
        return (f"tokenizer.vocab_size {vocab_size} is too small for a {kind} tokenizer of this corpus: its characters "
                f"and the special tokens alone need {too_small[1]} (set tokenizer.vocab_size to at least {too_small[1]})")
    if "as int" in message:
        return (f"tokenizer.vocab_size {vocab_size:,} is more than sentencepiece can take (at most 2,147,483,647); "
                "a corpus gives far fewer pieces, so set a smaller tokenizer.vocab_size")
    reason = (message.split("]")[-1].strip() or message).splitlines()[0]
    return f"sentencepiece could not train a {kind} tokenizer with tokenizer.vocab_size {vocab_size}: {reason}"


def reservoir_sample(items: Iterable[str], k: int, seed: int) -> list[str]:
    """A uniform random sample of `k` of `items` in one pass and O(k) memory, in their original
    order; all of them when there are at most `k`.

    Li's Algorithm L (1994): after the first k, it jumps over a geometrically distributed number
    of items to the next one that replaces a random slot, so most items cost no random draw.
    """
    rng = random.Random(seed)
    stream = iter(items)
    sample = list(itertools.islice(stream, k))
    if len(sample) < k:
        return sample
    positions = list(range(k))
    position = k - 1
    w = math.exp(math.log(1.0 - rng.random()) / k)
    while True:
        skip = int(math.log(1.0 - rng.random()) / math.log1p(-w)) if w < 1.0 else 0
        item = next(itertools.islice(stream, skip, None), None)
        if item is None:
            break
        position += skip + 1
        slot = rng.randrange(k)
        sample[slot], positions[slot] = item, position
        w *= math.exp(math.log(1.0 - rng.random()) / k)
    return [sample[i] for i in sorted(range(k), key=positions.__getitem__)]
