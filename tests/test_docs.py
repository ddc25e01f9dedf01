"""docs/configuration.md is what `make docs` generates from lmtrain/config.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from lmtrain import config
from lmtrain.tools.config_docs import field_comments, render

ROOT = Path(__file__).resolve().parents[1]


def test_committed_configuration_page_is_the_generated_one():
    committed = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert committed == render(), "docs/configuration.md is stale: run `make docs`"


def test_every_config_key_has_a_meaning_and_its_default_on_the_page():
    comments = field_comments(Path(config.__file__).read_text(encoding="utf-8"))
    page = render()
    for section, cls in config.SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert comments.get((cls.__name__, f.name)), f"{section}.{f.name} has no comment in config.py"
            assert f"| `{section}.{f.name}` | `{config.toml_value(getattr(cls(), f.name))}` |" in page


def test_field_comments_reads_the_lines_above_and_the_line_end():
    source = (
        "class A:\n"
        "    x: int = 1  # at the end\n"
        "    # above, first\n"
        "    # above, second\n"
        "    y: int = 2\n"
        "    z: int = 3\n"
    )
    assert field_comments(source) == {("A", "x"): "at the end", ("A", "y"): "above, first above, second", ("A", "z"): ""}
