"""Shell completion (typer's --install-completion / --show-completion): the script it prints, and
the completions that script asks the program for, run as the shell would run them (the program
named `lmtrain`, as the installed entry point is)."""

import os
import subprocess
import sys

import pytest

AS_INSTALLED = "import sys; from lmtrain.cli import main; sys.argv[0] = 'lmtrain'; main()"


def lmtrain(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", AS_INSTALLED, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_show_completion_prints_a_bash_script():
    result = lmtrain("--show-completion", "bash")
    assert result.returncode == 0, result.stderr
    assert "complete " in result.stdout and "_LMTRAIN_COMPLETE=complete_bash" in result.stdout


@pytest.mark.parametrize("words, index, expected", [("lmtrain tr", "1", "train"), ("lmtrain gen", "1", "generate"),
                                                    ("lmtrain train --run-d", "2", "--run-dir")])
def test_the_completions_the_script_asks_for(words, index, expected):
    """What bash's completion function runs: the program with _LMTRAIN_COMPLETE=complete_bash."""
    result = lmtrain(env={"_LMTRAIN_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": index})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [expected]
