"""docs/api.md's examples run as they are: every ```python block, in order, in one namespace, in a
directory holding a small generated corpus/ (the page says so)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from helpers import private_cache_one_thread, write_small_corpus

PAGE = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", PAGE.read_text(encoding="utf-8"), flags=re.S | re.M)


def test_the_page_has_examples_of_each_part():
    text = "\n".join(blocks())
    for call in ("lmtrain.train(", "lmtrain.load(", ".perplexity(", ".score(", ".generate(", "stream=True",
                 "lmtrain.evaluate(", "init_from=", "lmtrain.LmtrainError"):
        assert call in text, call


def test_every_example_runs(tmp_path_factory, tmp_path, capsys):
    with private_cache_one_thread(tmp_path_factory):
        # the context's own chdir restores the starting directory on leaving; a second monkeypatch
        # here would restore the context's directory instead, after it, for every later test
        os.chdir(tmp_path)
        write_small_corpus(tmp_path / "corpus")
        namespace: dict = {}
        for number, code in enumerate(blocks(), 1):
            try:
                exec(compile(code, f"docs/api.md block {number}", "exec"), namespace)
            except Exception as e:  # name the block that failed
                pytest.fail(f"docs/api.md block {number} raised {type(e).__name__}: {e}\n{code}")
    printed = capsys.readouterr().out
    assert "run not found: runs/missing" in printed and "model.hidden_size = 32 (RUN has 16)" in printed
    assert (tmp_path / "runs" / "toy-tuned" / "best.pt").is_file() and not (tmp_path / "runs" / "bad").exists()
