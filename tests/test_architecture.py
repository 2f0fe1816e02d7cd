"""The layers of docs/architecture.md, checked against the code: who may import whom, and the map
of folders and modules. Pure reads of the source tree (ast), no imports."""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "canestra"
DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # `from canestra import api` imports the module canestra.api
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def _files(part: str) -> list[Path]:
    root = SRC / part
    return sorted(root.rglob("*.py")) if root.is_dir() else [SRC / f"{part}.py"]


def _violations(parts: tuple[str, ...], forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for part in parts:
        for path in _files(part):
            for mod in sorted(_imports(path)):
                if any(mod == f or mod.startswith(f + ".") for f in forbidden):
                    bad.append(f"{path.relative_to(SRC)} imports {mod}")
    return bad


def test_inner_layers_never_import_the_front_doors():
    assert _violations(("pipeline", "vision", "answer", "storage", "model", "privacy"),
                       ("canestra.api", "canestra.cli")) == []


def test_serve_never_imports_the_pipeline_or_spark():
    assert _violations(("serve",), ("canestra.pipeline", "canestra.sparkctx", "pyspark")) == []


def test_model_folder_code_is_spark_free():
    assert _violations(("model",), ("pyspark", "canestra.pipeline", "canestra.sparkctx")) == []


def test_the_cli_goes_through_the_api():
    assert _violations(("cli",), ("canestra.pipeline", "canestra.vision", "canestra.storage",
                                  "canestra.sparkctx")) == []


def test_the_checker_sees_a_violation(tmp_path):
    """Positive control: the same reading flags a late import inside a function."""
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from canestra import api\n    import pyspark.sql\n")
    assert {"canestra.api", "pyspark.sql"} <= _imports(f)


def _map_cells() -> list[str]:
    """The folder column of each row of the doc's first table."""
    text = DOC.read_text()
    table = text[text.index("| part | folder |"):]
    table = table[:table.index("\n\n")]
    return [[c.strip() for c in line.strip().strip("|").split("|")][1] for line in table.splitlines()[2:]]


def _named() -> tuple[set[Path], set[Path]]:
    """(files and folders the map names, folders whose whole content it covers). ``pkg/`` (`a.py`, `sub/`)
    names modules inside a package; a name outside parentheses is a top-level module."""
    named: set[Path] = set()
    whole: set[Path] = set()
    for cell in _map_cells():
        for pkg, inner in re.findall(r"`([^`]+/)`\s*\(([^)]*)\)", cell):
            folder = SRC / pkg.rstrip("/")
            named.add(folder)
            for name in re.findall(r"`([^`]+)`", inner):
                named.add(folder / name.rstrip("/"))
                if name.endswith("/"):
                    whole.add(folder / name.rstrip("/"))
        outside = re.sub(r"`[^`]+/`\s*\([^)]*\)", "", cell)
        for name in re.findall(r"`([^`]+)`", outside):
            named.add(SRC / name.rstrip("/"))
    return named, whole


def test_every_module_the_map_names_exists():
    named, _ = _named()
    assert sorted(str(p.relative_to(SRC)) for p in named if not p.exists()) == []


def test_every_module_is_in_the_map():
    named, whole = _named()
    unnamed = []
    for path in SRC.rglob("*.py"):
        if path.name in ("__init__.py", "__main__.py") and path.parent != SRC and path.parent in named:
            continue  # a package's own markers
        if path in named or any(d in path.parents for d in whole):
            continue
        unnamed.append(str(path.relative_to(SRC)))
    assert sorted(unnamed) == []


def test_where_to_change_what_names_real_paths():
    text = DOC.read_text()
    section = text[text.index("### Where to change what"):]
    section = section[:section.index("\n## ")]
    paths = re.findall(r"`(src/canestra/[^`]+)`", section)
    assert len(paths) >= 10
    root = SRC.parents[1]
    assert [p for p in paths if not (root / p).exists()] == []
