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


# ---------------------------------------------------------------------------- private internals
# pipeline, vision and storage keep their internals private: each module's ``__all__`` names what
# other modules may import from it (a package's ``__all__``, the submodules other packages may
# import), and underscore names never cross a module. src/ and bench/ are both held to it.

BENCH = SRC.parents[1] / "bench"
GUARDED = ("pipeline", "vision", "storage")


def _module_name(path: Path) -> str:
    """canestra.pipeline.train for src/canestra/pipeline/train.py; bench.<name> for a bench."""
    if SRC in path.parents:
        parts = ("canestra", *path.relative_to(SRC).with_suffix("").parts)
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    return f"bench.{path.stem}"


def _guarded_modules() -> dict[str, Path]:
    return {_module_name(p): p for part in GUARDED for p in sorted((SRC / part).rglob("*.py"))}


def _declared_all(path: Path) -> list[str] | None:
    """The module-level ``__all__`` list of a file (None when it has none)."""
    for node in ast.parse(path.read_text(), str(path)).body:
        targets = (node.targets if isinstance(node, ast.Assign)
                   else [node.target] if isinstance(node, ast.AnnAssign) else [])
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets) and node.value is not None:
            return list(ast.literal_eval(node.value))
    return None


def _bound_names(path: Path) -> set[str]:
    """Names a module binds at its top level (also under module-level if/try)."""
    names: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names.update((a.asname or a.name).split(".")[0] for a in node.names)
            elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
            elif isinstance(node, ast.If):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)
                visit(node.orelse)
                visit(node.finalbody)

    visit(ast.parse(path.read_text(), str(path)).body)
    return names


def _guarded_uses(source: str, me: str, modules: set[str], is_pkg: bool = False) -> list[tuple[str, str, int]]:
    """(module, name, line) for every name code in module ``me`` takes from a guarded module:
    ``from m import name``, ``alias.name`` on a module imported as ``alias`` (``from pkg import
    mod``, ``import pkg.mod as alias``, ``import pkg.mod``), and the submodule itself as a name of
    its package when ``me`` lies outside that package. Uses inside the module itself are not listed.
    ``is_pkg``: ``me`` is a package's ``__init__`` (for relative imports)."""
    tree = ast.parse(source)
    uses: list[tuple[str, str, int]] = []
    aliases: dict[str, str] = {}  # local name -> guarded module it stands for
    dotted_roots: set[str] = set()  # `import canestra.x.y`: the chain canestra.x.y.name is used as written

    def outside(pkg: str) -> bool:
        return not (me == pkg or me.startswith(pkg + "."))

    def take(mod: str, name: str, line: int) -> None:
        if mod == me:
            return
        if f"{mod}.{name}" in modules:  # a submodule, named through its package
            if outside(mod):
                uses.append((mod, name, line))
            return
        uses.append((mod, name, line))

    def module_itself(mod: str, line: int) -> None:  # importing canestra.pkg.mod names mod in pkg
        pkg, _, sub = mod.rpartition(".")
        if pkg in modules and outside(pkg):
            uses.append((pkg, sub, line))

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                base = me.split(".") if is_pkg else me.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join([*base, mod] if mod else base)
            if mod not in modules:
                continue
            module_itself(mod, node.lineno)
            for a in node.names:
                take(mod, a.name, node.lineno)
                if f"{mod}.{a.name}" in modules:
                    aliases[a.asname or a.name] = f"{mod}.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name not in modules:
                    continue
                module_itself(a.name, node.lineno)
                if a.asname:
                    aliases[a.asname] = a.name
                else:
                    dotted_roots.add(a.name.split(".")[0])

    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        chain = [node.attr]
        value = node.value
        while isinstance(value, ast.Attribute):
            chain.append(value.attr)
            value = value.value
        if not isinstance(value, ast.Name):
            continue
        if value.id in aliases:
            base = aliases[value.id]
        elif value.id in dotted_roots:
            base = value.id
        else:
            continue
        parts = [*base.split("."), *reversed(chain)]
        # a node counts when its attribute directly follows a module (a.b.mod.name, not a.b.mod.name.attr)
        for i in range(len(parts) - 1, 0, -1):
            if ".".join(parts[:i]) in modules:
                if i == len(parts) - 1:
                    take(".".join(parts[:i]), parts[i], node.lineno)
                break
    return uses


def _privacy_violations(source: str, me: str, is_pkg: bool = False) -> list[str]:
    """``line: module.name`` for each private or unlisted name module ``me`` takes from a guarded module."""
    guarded = _guarded_modules()
    public = {m: set(_declared_all(p) or ()) for m, p in guarded.items()}
    return sorted({f"{line}: {mod}.{name}" for mod, name, line in _guarded_uses(source, me, set(guarded), is_pkg)
                   if name.startswith("_") or name not in public[mod]})


def test_guarded_modules_declare_their_public_names():
    """Every pipeline/vision/storage module has an ``__all__`` of names it binds (a package: of its
    submodules), none of them underscore names."""
    bad = []
    for mod, path in _guarded_modules().items():
        names = _declared_all(path)
        if names is None:
            bad.append(f"{mod}: no __all__")
            continue
        if path.name == "__init__.py":
            missing = [n for n in names if not (path.parent / f"{n}.py").exists() and not (path.parent / n).is_dir()]
        else:
            bound = _bound_names(path)
            missing = [n for n in names if n not in bound]
        bad += [f"{mod}: __all__ names {n}, which it does not define" for n in missing]
        bad += [f"{mod}: __all__ names the private {n}" for n in names if n.startswith("_")]
    assert bad == []


def test_src_and_bench_use_only_public_names_of_the_internals():
    bad = []
    for path in sorted(SRC.rglob("*.py")) + sorted(BENCH.glob("*.py")):
        where = path.relative_to(SRC.parents[1])
        bad += [f"{where}:{v}" for v in _privacy_violations(path.read_text(), _module_name(path),
                                                             path.name == "__init__.py")]
    assert bad == []


def test_the_privacy_checker_sees_a_violation():
    """Positive control: a bench that reaches for private names is flagged, its public uses are not."""
    source = ("import canestra.vision.backbone\n"
              "from canestra.pipeline import pca, train as t\n"
              "from canestra.vision.backbone import _GRAPH_CACHE, embed\n"
              "def f():\n"
              "    from canestra.storage.files import list_images\n"
              "    t.make_classifier(1, 2)\n"
              "    canestra.vision.backbone.model_path()\n"
              "    return t._featurize_step, canestra.vision.backbone._session_cache, pca.fit_pca\n")
    modules = set(_guarded_modules())
    uses = _guarded_uses(source, "bench.x", modules)
    assert {(m, n) for m, n, _ in uses} == {
        ("canestra.vision", "backbone"), ("canestra.pipeline", "pca"), ("canestra.pipeline", "train"),
        ("canestra.vision.backbone", "_GRAPH_CACHE"), ("canestra.vision.backbone", "embed"),
        ("canestra.storage", "files"), ("canestra.storage.files", "list_images"),
        ("canestra.pipeline.train", "make_classifier"), ("canestra.vision.backbone", "model_path"),
        ("canestra.pipeline.train", "_featurize_step"), ("canestra.vision.backbone", "_session_cache"),
        ("canestra.pipeline.pca", "fit_pca")}
    assert _privacy_violations(source, "bench.x") == [
        "2: canestra.pipeline.pca", "3: canestra.vision.backbone._GRAPH_CACHE",
        "8: canestra.pipeline.train._featurize_step", "8: canestra.vision.backbone._session_cache"]
    # inside the package, sibling modules are the package's own business; names still need __all__
    inside = _guarded_uses("from canestra.pipeline import pca\npca._DRIVER_PCA_MAX_VALUES\n",
                           "canestra.pipeline.train", modules)
    assert [(m, n) for m, n, _ in inside] == [("canestra.pipeline.pca", "_DRIVER_PCA_MAX_VALUES")]
