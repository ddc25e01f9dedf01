"""The layout's rules (docs/architecture.md), read from the source with ast:

- a stage imports another stage only through its face (`lmtrain.text`, never `lmtrain.text.tokens`),
  and takes from it only what the face offers (`from lmtrain.model import kernels` goes past it
  unless the face lists `kernels`);
- a module never takes names from its own stage's face (the face imports the module: a cycle);
  `from lmtrain.training import distributed`, a sibling module, is no cycle;
- no module imports a higher floor: base -> text -> model -> generation -> evaluation -> training
  -> tools -> api -> cli (the package's face, lmtrain/__init__.py, above them all);
- every stage has a face with a docstring;
- no Python module and no C++ file over 400 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lmtrain"
# api: the Python API (lmtrain.load, lmtrain.train), beside the CLI and below it, so that it can
# never reach the CLI's exits; the package's own face, lmtrain/__init__.py, offers it lazily
FLOORS = ["base", "text", "model", "generation", "evaluation", "training", "tools", "api", "cli"]
STAGES = FLOORS[1:]
MAX_LINES = 400


def stage_of(module: str) -> str:
    """lmtrain.text.tokens -> text; lmtrain.config -> base; lmtrain.__main__ is the CLI's."""
    parts = module.split(".")
    if parts[1:2] == ["__main__"]:
        return "cli"
    if module == "lmtrain":  # the package's face stands above every floor: it offers the API
        return FLOORS[-1]
    return parts[1] if len(parts) > 1 and parts[1] in STAGES else "base"


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every lmtrain import in `path`, `from lmtrain import x` as lmtrain.x."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.startswith("lmtrain"):
            if node.module == "lmtrain":
                found += [(node.lineno, f"lmtrain.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("lmtrain")]
    return found


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_the_package_is_laid_out_in_stages():
    for stage in STAGES:
        face = PACKAGE / stage / "__init__.py"
        assert face.is_file(), f"lmtrain/{stage} has no face"
        assert ast.get_docstring(ast.parse(face.read_text())), f"lmtrain/{stage}/__init__.py says nothing of its stage"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_down_the_floors_and_through_the_faces(path):
    here = stage_of(module_name(path))
    for line, module in imports(path):
        there = stage_of(module)
        if there == here or there == "base":
            continue
        assert FLOORS.index(there) < FLOORS.index(here), f"line {line}: {here} imports {module}, a higher floor"
        assert module == f"lmtrain.{there}", f"line {line}: {module} is inside {there}; import it from lmtrain.{there}"


def from_imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, module, names) of every `from lmtrain... import names` in `path`."""
    return [(node.lineno, node.module, [a.name for a in node.names])
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.startswith("lmtrain.")]


def face_offers(stage: str) -> set[str]:
    """The names a stage's face lists in its __all__."""
    for node in ast.parse((PACKAGE / stage / "__init__.py").read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return {ast.literal_eval(e) for e in node.value.elts}
    return set()


def is_submodule(stage: str, name: str) -> bool:
    return (PACKAGE / stage / f"{name}.py").is_file() or (PACKAGE / stage / name / "__init__.py").is_file()


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_a_face_is_passed_only_with_what_it_offers(path):
    here = stage_of(module_name(path))
    for line, module, names in from_imports(path):
        there = stage_of(module)
        if module != f"lmtrain.{there}" or there in (here, "base"):
            continue
        missing = [n for n in names if n not in face_offers(there)]
        assert not missing, f"line {line}: takes {', '.join(missing)} from lmtrain.{there}, whose face does not offer it"


@pytest.mark.parametrize("path", [p for p in SOURCES if p.name != "__init__.py" and stage_of(module_name(p)) != "base"
                                  and p.parent != PACKAGE], ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_takes_names_from_its_own_face(path):
    here = stage_of(module_name(path))
    for line, module, names in from_imports(path):
        through = [n for n in names if not is_submodule(here, n)]
        assert not (module == f"lmtrain.{here}" and through), \
            f"line {line}: {', '.join(through)} through its own face (a cycle): import the sibling module itself"


@pytest.mark.parametrize("path", sorted([*PACKAGE.rglob("*.py"), *PACKAGE.rglob("*.cpp"), *PACKAGE.rglob("*.h")]),
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_file_is_over_400_lines(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(PACKAGE)} has {lines} lines: split it by job"


def test_the_rules_catch_what_they_forbid(tmp_path):
    """The checks themselves: a higher floor and an inner module are what stage_of tells apart."""
    assert stage_of("lmtrain.text.tokens") == "text" and stage_of("lmtrain.config") == "base"
    assert stage_of("lmtrain.__main__") == "cli" and stage_of("lmtrain.model.kernels.build") == "model"
    assert stage_of("lmtrain") == "cli" and stage_of("lmtrain.api.model") == "api"
    sample = tmp_path / "sample.py"
    sample.write_text("from lmtrain import runs\nimport lmtrain.model.saved\nfrom lmtrain.text import Tokenizer\n")
    assert imports(sample) == [(1, "lmtrain.runs"), (2, "lmtrain.model.saved"), (3, "lmtrain.text")]
    assert from_imports(sample) == [(3, "lmtrain.text", ["Tokenizer"])]
    assert {"Tokenizer", "load_corpus"} <= face_offers("text") and "tokens" not in face_offers("text")
    assert is_submodule("text", "tokens") and is_submodule("model", "kernels") and not is_submodule("text", "Tokenizer")
