"""Many samples, streamed: text comes out as it is drawn, whatever the number of samples or tokens.

Samples are printed in order, one after another, each as it is drawn (no interleaving). They are
drawn in groups of streams (lmtrain.generation.sampler.Sampler: one batch per group); in a group, the first
sample not yet printed, the head, is printed token by token, while the others keep what they drew
until their turn:

    group of G streams:   sample 1  ▶ printed as drawn     (the head)
                          sample 2  ▶ held, printed when 1 ends, then as drawn
                          ...
    next group: samples G+1 ... 2G, from the same primed state

Sample i uses the generator seeded seed + i - 1 whatever group it falls in, and every stream is
computed on its own, so the text is that of a single sample with that seed: the group size
changes the speed, never the text. It is chosen so that what is held stays bounded
(`group_size`): the held text (max_tokens x the longest token) within TEXT_BUDGET_BYTES, the
streams' state, logits and generators within the memory lmtrain.memory allows, at most
MAX_STREAMS; a huge --max-tokens therefore draws one sample at a time. A stop text is found with
`StopCut`, which holds back only the last characters that might still begin one, so memory does
not grow with the length of a sample.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterable, Iterator

from lmtrain.errors import LmtrainError, require
from lmtrain.generation.sampler import UNIFORM_CHUNK, SampleSettings, Sampler, StreamRandom, first_stop
from lmtrain.memory import require_fits, usable_bytes
from lmtrain.model import LanguageModel
from lmtrain.text import EOS_ID, Tokenizer

MAX_STREAMS = 1024  # streams per group: beyond this a batch is no faster per stream
TEXT_BUDGET_BYTES = 256 * 2**20  # text held for the samples of a group that wait for their turn
PIECE_OVERHEAD_BYTES = 64  # a held token's text: a Python str and its place in a list
GENERATOR_BYTES = 4096  # one CPU torch.Generator (an mt19937 state, ~2.7 KB measured)
JSONL_PART_CHARS = 1 << 16  # a longer sample is written as several jsonl records ("done": false, ...)
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes


def check_seed(seed: int, streams: int) -> None:
    """Every seed used (seed ... seed + streams - 1) must be one a generator takes."""
    low, high = SEED_RANGE
    require((low <= seed and seed + streams - 1 <= high,
             f"--seed {seed} is out of range: the samples use seeds {seed} to {seed + streams - 1}, and each must lie in "
             f"[{low}, {high}] (what torch's generators take)" if streams > 1 else
             f"--seed {seed} is out of range: it must lie in [{low}, {high}] (what torch's generators take)"))


class StopCut:
    """`first_stop` of a text given piece by piece, in memory bounded by the longest stop text:
    `feed` returns what can be printed (all but the longest tail that begins a stop text), `ended`
    turns true at the first stop (which is never returned), `flush` gives back what was held."""

    def __init__(self, stops: Iterable[str]):
        self.stops = [s for s in stops if s]
        self.keep = max((len(s) for s in self.stops), default=1) - 1  # a stop's head can reach back this far
        self.held = ""
        self.ended = False

    def feed(self, piece: str) -> str:
        # a stop starting in text already returned would have lain whole in an earlier window
        text = self.held + piece
        shown = first_stop(text, self.stops)
        if len(shown) < len(text):
            self.ended, self.held = True, ""
            return shown
        hold = next((k for k in range(min(self.keep, len(text)), 0, -1)
                     if any(stop.startswith(text[-k:]) for stop in self.stops)), 0)
        out, self.held = text[:len(text) - hold], text[len(text) - hold:]
        return out

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


def longest_piece(tokenizer: Tokenizer) -> int:
    """Characters of the longest token text (<unk>, <eos> and every piece)."""
    return max(len(tokenizer.token_text(i)) for i in range(tokenizer.vocab_size))


def stream_bytes(model: LanguageModel) -> int:
    """A rough upper bound of the memory one stream takes while drawing: its state and logits in
    every copy the sampler and `pick` hold (a handful of each), its uniforms and its generator."""
    state = sum(t.numel() for layer in model.init_state(1) for t in layer)
    return 4 * (8 * model.vocab_size + 4 * state) + 4 * 2 * UNIFORM_CHUNK + GENERATOR_BYTES


def group_size(model: LanguageModel, tokenizer: Tokenizer, settings: SampleSettings) -> int:
    """Streams drawn at once (see the module's docstring); refuses, with one line, a model whose
    single stream cannot fit."""
    device = model.decoder.weight.device
    per_stream = stream_bytes(model)
    require_fits(per_stream, f"one sample of this model (vocabulary {model.vocab_size:,})", "use a smaller model", device)
    host = usable_bytes() if device.type == "cuda" else None  # the generators and the text stay on the host
    fit = usable_bytes(device) // per_stream
    if host is not None:
        fit = min(fit, host // GENERATOR_BYTES)
    held = settings.max_tokens * (longest_piece(tokenizer) + PIECE_OVERHEAD_BYTES)  # one waiting sample's text
    waiting = TEXT_BUDGET_BYTES // held
    return max(1, min(settings.num_samples, MAX_STREAMS, fit, waiting + 1))


def draw_samples(model: LanguageModel, tokenizer: Tokenizer, prompt_ids: list[int], settings: SampleSettings,
                 group: int | None = None) -> Iterator[tuple[int, str, bool]]:
    """(sample number, from 1; text; whether the sample ends here), in order: every event of
    sample k comes before any of sample k + 1, each sample ends with exactly one event marked
    ended, and the texts of a sample joined are its text (cut before its first stop text).

    The context is `<eos>` followed by `prompt_ids`, run through the model once; every group
    starts from that state. `group`: streams drawn at once (default: `group_size`)."""
    check_seed(settings.seed, settings.num_samples)
    group = group or group_size(model, tokenizer, settings)
    primed = Sampler(model, settings.precision)
    primed.feed([EOS_ID] + prompt_ids)
    for first in range(0, settings.num_samples, group):
        size = min(group, settings.num_samples - first)
        yield from draw_group(primed.branch(size), tokenizer, settings, first, size)


def draw_group(sampler: Sampler, tokenizer: Tokenizer, settings: SampleSettings, first: int,
               size: int) -> Iterator[tuple[int, str, bool]]:
    """Samples first + 1 ... first + size, drawn as one batch (see `draw_samples`)."""
    s = settings
    cuts = [StopCut(s.stops) for _ in range(size)]
    waiting: list[list[str]] = [[] for _ in range(size)]  # text of the samples after the head
    head = 0
    steps = sampler.draw(s, StreamRandom(s.seed + first, size))
    for tokens in steps:
        for i, token in enumerate(tokens.tolist()):
            if i < head or cuts[i].ended:
                continue
            text = cuts[i].feed(tokenizer.token_text(token))
            if text and i == head:
                yield first + head + 1, text, False
            elif text:
                waiting[i].append(text)
        while head < size and cuts[head].ended:
            yield first + head + 1, "", True
            head += 1
            if head < size:
                yield from ((first + head + 1, text, False) for text in waiting[head])
                waiting[head] = []
        if head == size:
            steps.close()  # every sample has ended: draw no further
            return
    for i in range(head, size):  # max_tokens reached
        yield from ((first + i + 1, text, False) for text in waiting[i])
        waiting[i] = []
        yield first + i + 1, cuts[i].flush(), True


# --- writing the samples ------------------------------------------------------------------------


def write_text(events: Iterable[tuple[int, str, bool]], prompt: str, out, headers: bool) -> None:
    """Each sample as `--- sample k` (with `headers`), then the prompt and its text, then a line
    end, written (and flushed) as drawn."""
    current = 0
    for k, text, ended in events:
        if k != current:
            out.write((f"--- sample {k}\n" if headers else "") + prompt)
            current = k
        out.write(text + ("\n" if ended else ""))
        out.flush()


def jsonl_records(events: Iterable[tuple[int | None, str, bool]], prompt: str) -> Iterator[dict]:
    """One record per sample, {"sample", "prompt", "text", "done": true}; a sample longer than
    JSONL_PART_CHARS comes as several consecutive records of the same sample, all but the last
    with "done": false, so that no record waits for the whole of a long sample. Joining the
    "text" of a sample's records gives its text. `sample` None: records without that key."""
    current, parts, chars = None, [], 0
    for k, text, ended in events:
        if k != current:
            current, parts, chars = k, [], 0
        parts.append(text)
        chars += len(text)
        if ended or chars >= JSONL_PART_CHARS:
            record = {} if k is None else {"sample": k}
            yield {**record, "prompt": prompt, "text": "".join(parts), "done": ended}
            parts, chars = [], 0


def write_jsonl(events: Iterable[tuple[int | None, str, bool]], prompt: str, out) -> None:
    for record in jsonl_records(events, prompt):
        out.write(json.dumps(record) + "\n")
        out.flush()


def draw_turn(sampler: Sampler, tokenizer: Tokenizer, settings: SampleSettings,
              random: StreamRandom) -> Iterator[tuple[None, str, bool]]:
    """One turn of --interactive: the continuation of what `sampler` was fed, as events of
    `draw_samples`' kind (sample None), up to the first stop text; the state carries on."""
    cut = StopCut(settings.stops)
    steps = sampler.draw(settings, random)
    for token in steps:
        text = cut.feed(tokenizer.token_text(int(token)))
        if text:
            yield None, text, False
        if cut.ended:
            steps.close()
            yield None, "", True
            return
    yield None, cut.flush(), True


# --- text from the command line and standard input ----------------------------------------------


def utf8_text(data: bytes | str, what: str, errors: str = "strict") -> str:
    """`data` as text: bytes (standard input) or a str from the command line, where Python keeps
    bytes that are not UTF-8 as lone surrogates. errors: strict (one line naming the byte) or
    replace (U+FFFD for each bad byte)."""
    if isinstance(data, str):
        try:
            data = data.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            data = data.encode("utf-8", "surrogatepass")  # lone surrogates of another origin: invalid UTF-8 too
    try:
        return codecs.utf_8_decode(data, errors, True)[0]
    except UnicodeDecodeError as e:
        raise LmtrainError(f"{what} is not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); "
                           "give UTF-8 text, or --encoding-errors replace to read such bytes as U+FFFD") from None

