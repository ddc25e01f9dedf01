"""How fast and in how much memory a large corpus is encoded: `python -m lmtrain.tools.bench_encode`.

    python -m lmtrain.tools.bench_encode --dir /tmp/lmtrain-bench --sizes 0.25,0.5,1 --workers 1,2

1. `generate` writes a synthetic English-like corpus of each size (deterministic: a Zipfian
   vocabulary of 50,000 made-up words, 1-60 words a line, about 23 on average, geometric) under --dir;
2. a BPE tokenizer (tokenizer.vocab_size 4000) is trained once on a 50,000-line sample of the
   smallest one;
3. each (size, workers) pair is encoded in a fresh process (`encode`, the path `lmtrain train`
   takes: load_text, then encode_split into a token file), round-robin over the repeats so a
   busy moment of a shared machine hits every setting alike; that process runs under
   /usr/bin/time -v when it exists, and also samples the resident memory of itself plus its
   workers every 0.1 s.

Reported per setting: encoding MB/s (corpus bytes / seconds in encode_split, median of the
repeats; the checking pass of load_text is timed apart), "Maximum resident set size" of the
main process (from /usr/bin/time -v; without it, from getrusage(RUSAGE_CHILDREN), which is the
largest of the process and its workers) and the sampled peak of the main process + its workers
summed (forked workers share pages, so the sum overstates what they use together). The corpora
and token files stay under --dir; delete it afterwards (--clean does).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

MB = 1 << 20
VOCAB_WORDS = 50_000
ZIPF_S = 1.07  # word frequencies of English text fall roughly as rank^-1 (Zipf's law)
MEAN_WORDS_PER_LINE = 25
SYLLABLES = "ba be bi bo bu da de di do du ka ke ki ko ku la le li lo lu ma me mi mo mu na ne ni no nu ra re ri ro ru sa se si so su ta te ti to tu".split()
WORDS_PER_CHUNK = 1 << 20


def make_vocabulary(n: int, rng: np.random.Generator) -> list[bytes]:
    """`n` distinct made-up words; frequent (low-rank) words are short, as in English."""
    words: list[bytes] = []
    seen = set()
    while len(words) < n:  # random draws in bulk: one call per batch, not per word
        batch = 4 * n
        ranks = len(words) + np.arange(batch) * (n - len(words)) / batch  # the ranks these candidates may take
        lengths = 1 + np.minimum(4, rng.exponential(0.4 + 2.0 * ranks / n)).astype(int)
        picks = rng.integers(len(SYLLABLES), size=(batch, 5))
        for length, row in zip(lengths.tolist(), picks.tolist()):
            word = "".join([SYLLABLES[i] for i in row[:length]])
            if word not in seen:
                seen.add(word)
                words.append(word.encode())
                if len(words) == n:
                    break
    return words


def generate(path: Path, size: int, seed: int = 0) -> None:
    """Write about `size` bytes (whole lines, at least `size`) of synthetic text to `path`."""
    rng = np.random.default_rng(seed)
    vocab = make_vocabulary(VOCAB_WORDS, rng)
    p = 1.0 / np.arange(1, VOCAB_WORDS + 1) ** ZIPF_S
    cdf = np.cumsum(p / p.sum())
    # a word followed by a space, or (at a line's end) by a full stop and a newline
    table = [w + b" " for w in vocab] + [w + b".\n" for w in vocab]
    written = 0
    chunk = min(WORDS_PER_CHUNK, max(1000, size // 4))  # words per draw: small files stay small
    with open(path, "wb") as f:
        while written < size:
            ranks = np.minimum(np.searchsorted(cdf, rng.random(chunk)), VOCAB_WORDS - 1)
            line_lengths = np.clip(rng.geometric(1 / MEAN_WORDS_PER_LINE, size=chunk), 1, 60)
            ends = np.cumsum(line_lengths) - 1
            ends = ends[ends < chunk]
            ranks[ends] += VOCAB_WORDS
            ranks = ranks[: ends[-1] + 1]  # whole lines only
            data = b"".join([table[i] for i in ranks.tolist()])
            f.write(data)
            written += len(data)


def encode(corpus: Path, model: Path, workers: int) -> dict:
    """Encode `corpus` as `lmtrain train` does, in this process; one JSON-able record."""
    from lmtrain.text import load_text
    from lmtrain.text import encode_split
    from lmtrain.text import Tokenizer

    peak = PeakMemory()
    peak.start()
    tokenizer = Tokenizer(model.read_bytes(), "bpe")
    start = time.perf_counter()
    text = load_text(corpus)
    checked = time.perf_counter()
    tokens = encode_split(tokenizer, text, workers=workers)
    done = time.perf_counter()
    peak.stop()
    size = corpus.stat().st_size
    return {
        "corpus_mb": size / MB,
        "workers": workers,
        "tokens": len(tokens.tokens),
        "check_s": checked - start,
        "encode_s": done - checked,
        "encode_mb_s": size / MB / (done - checked),
        "sampled_peak_rss_sum_mb": peak.peak / MB,
    }


class PeakMemory(threading.Thread):
    """Samples the resident memory of this process plus its children (the encoding workers)."""

    def __init__(self, every: float = 0.1):
        super().__init__(daemon=True)
        self.every, self.peak, self.done = every, 0, threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, rss(os.getpid()) + sum(rss(pid) for pid in children(os.getpid())))
            self.done.wait(self.every)

    def stop(self) -> None:
        self.done.set()
        self.join()


def rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def measure(corpus: Path, model: Path, workers: int, cache: Path) -> dict:
    """One `encode` in a fresh process with an empty cache; its record plus the maximum RSS."""
    shutil.rmtree(cache, ignore_errors=True)
    command = [sys.executable, "-m", "lmtrain.tools.bench_encode", "encode", str(corpus), str(model), str(workers)]
    timer = ["/usr/bin/time", "-v"] if Path("/usr/bin/time").exists() else []
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    done = subprocess.run(timer + command, capture_output=True, text=True, env={**os.environ, "LMTRAIN_CACHE": str(cache)})
    if done.returncode:
        raise SystemExit(f"encode failed:\n{done.stderr}")
    record = json.loads(done.stdout.strip().splitlines()[-1])
    found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    if found:
        record["max_rss_mb"], record["max_rss_from"] = int(found[1]) / 1024, "/usr/bin/time -v"
        # CPU seconds of the process and its workers: equal for 1 and 2 workers means the work
        # parallelises, whatever share of the cores other jobs leave
        cpu = re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)", done.stderr)
        record["cpu_s"] = sum(map(float, cpu))
    else:  # the largest child so far: only right when this one is the largest
        record["max_rss_mb"] = max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024
        record["max_rss_from"] = "getrusage(RUSAGE_CHILDREN)"
    shutil.rmtree(cache, ignore_errors=True)
    return record


def train_model(corpus: Path, out: Path) -> None:
    from lmtrain.text import load_text
    from lmtrain.text import sampled_pieces
    from lmtrain.progress import QuietProgress
    from lmtrain.text import train_tokenizer

    with QuietProgress().bytes_bar(0, "") as bar:
        tokenizer = train_tokenizer(sampled_pieces(load_text(corpus), bar), "bpe", 4000, sample_lines=50_000)
    out.write_bytes(tokenizer.model_proto)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["encode"]:
        corpus, model, workers = argv[1:4]
        print(json.dumps(encode(Path(corpus), Path(model), int(workers))))
        return
    parser = argparse.ArgumentParser(prog="python -m lmtrain.tools.bench_encode", description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/lmtrain-bench-encode"), help="where corpora and token files go")
    parser.add_argument("--sizes", default="0.25,0.5,1", help="corpus sizes in GB (2^30 bytes), comma-separated")
    parser.add_argument("--workers", default="1,2", help="encoding processes to compare, comma-separated")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each setting (median reported)")
    parser.add_argument("--clean", action="store_true", help="delete --dir at the end")
    args = parser.parse_args(argv)
    sizes = [float(s) for s in args.sizes.split(",")]
    workers = [int(w) for w in args.workers.split(",")]
    args.dir.mkdir(parents=True, exist_ok=True)
    corpora = {}
    for gb in sizes:
        corpora[gb] = args.dir / f"synthetic-{gb:g}GB.txt"
        if not corpora[gb].is_file() or corpora[gb].stat().st_size < gb * 1024 * MB:
            start = time.perf_counter()
            generate(corpora[gb], int(gb * 1024 * MB))
            print(f"generated {corpora[gb]} ({corpora[gb].stat().st_size / MB:,.0f} MB) in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    model = args.dir / "bpe4000.model"
    if not model.is_file():
        train_model(corpora[min(sizes)], model)
    runs: dict[tuple[float, int], list[dict]] = {}
    for _ in range(args.repeats):
        for gb in sizes:
            for w in workers:
                record = measure(corpora[gb], model, w, args.dir / "cache")
                print(json.dumps(record), file=sys.stderr)
                runs.setdefault((gb, w), []).append(record)
    print(f"| corpus | workers | encode MB/s | vs 1 worker | CPU s (all processes) | max RSS, main process (MB) | peak RSS, main + workers summed (MB) |")
    print("|---|---|---|---|---|---|---|")
    for gb in sizes:
        base = statistics.median(r["encode_mb_s"] for r in runs.get((gb, 1), [{"encode_mb_s": float("nan")}]))
        for w in workers:
            rs = runs[(gb, w)]
            speed = statistics.median(r["encode_mb_s"] for r in rs)
            cpu = statistics.median(r.get("cpu_s", float("nan")) for r in rs)
            print(f"| {rs[0]['corpus_mb']:,.0f} MB | {w} | {speed:.2f} | {speed / base:.2f}x | {cpu:.0f} | "
                  f"{max(r['max_rss_mb'] for r in rs):,.0f} | {max(r['sampled_peak_rss_sum_mb'] for r in rs):,.0f} |")
    print(f"(median of {args.repeats}; max RSS from {runs[(sizes[0], workers[0])][0]['max_rss_from']}; "
          f"{len(os.sched_getaffinity(0))} CPUs)")
    if args.clean:
        shutil.rmtree(args.dir)


if __name__ == "__main__":
    main()
