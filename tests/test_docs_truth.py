"""The docs name only code that exists and state only the defaults the code has.

Reads README.md, docs/*.md (and the comments of pyproject.toml for paths) and fails when:

(a) **paths**: a path whose first folder is one of the repository's (``src/``, ``bench/``, ``tests/``,
    ``docs/``, ``deploy/``, ``sample/``, ``.ci/``) or one of the package's (``pipeline/``, ``privacy/`` ...,
    i.e. relative to ``src/canestra``) and that ends in a file suffix does not exist; a backticked bare
    ``name.py`` matches no file of the tree; a relative Markdown link target is missing; a pytest node id
    (``tests/test_x.py::test_y``, ``test_x.py::test_y``, or ``::test_y`` after one of those) names a test
    file or test function that does not exist;
(b) **dotted names**: a backticked ``canestra.x.y``, ``module.name`` or ``Class.member`` whose first part is a
    canestra module, package or top-level class (``pipeline.features.update_views``, ``erase._traces``,
    ``s3.S3Options.sse_kwargs``, ``Settings.image_sizes``) does not resolve. Resolution reads the source with
    ``ast`` (top-level defs, classes and their members, assignments, imports, ``_EXPORTS``); nothing heavy is
    imported. A backticked dotted name whose first part is neither canestra's nor listed in ``FOREIGN`` (or a
    variable a ```python block of the same page assigns) fails too, so a module that is renamed away cannot
    leave its old name standing in the docs unnoticed;
(c) **defaults**: a sentence states a default that disagrees with the code. The forms checked, each tied
    to a flag (``--x``) or an environment variable (``CANESTRA_X``) of the CLI:

    - ``--flag … (default V`` / ``--flag …, default V`` / ``--flag … defaults to V`` (V the first value after
      "default", within the same clause: no other flag, ``;`` or sentence end in between);
    - ``--flag (`V` default`` and ``V (default)`` right after the flag;
    - ``the default is `--flag V```;
    - a Markdown table with a ``Default`` column and the flag (or env var) in its first columns.

    V is compared with ``Settings()`` when the flag's destination is a Settings field, else with the
    parser's own default (``--trigger``, ``--hours`` …). Values that are not plain (``4 × --max-decoded-mb``,
    "none", "the AWS default") are not checked. The same forms are checked in every ``--help`` text.
    Also checked: a sentence calling an image size or a feature dimension "the default" (``default 224 px``,
    ``160 px (default)``, ``1280-d`` in the README's data flow) unless it dates itself (``old default``,
    ``2026-12-01 defaults``, ``then``);
(d) **environment variables**: a ``CANESTRA_X`` a doc names is neither a Settings field nor read anywhere
    in src/, bench/, tests/ or .ci/.

Each checker is also fed a known-bad snippet (positive controls at the end), so this file can fail.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import re
from pathlib import Path

import pytest

from canestra.cli import commands
from canestra.config import Settings, parse_sizes

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PKG = SRC / "canestra"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PYPROJECT = ROOT / "pyproject.toml"

REPO_DIRS = ("src", "bench", "tests", "docs", "deploy", "sample", ".ci")
SUBPACKAGES = tuple(sorted(p.name for p in PKG.iterdir() if (p / "__init__.py").is_file()))
FILE_SUFFIXES = ("py", "md", "csv", "txt", "sh", "json", "jsonl", "yaml", "yml", "toml", "properties", "html",
                 "jpg", "png", "db", "ini", "log", "zip", "gz", "onnx", "pth")
# First parts of backticked dotted names that are not canestra code: Spark/JVM settings and classes,
# the standard library, third-party APIs, AWS names.
FOREIGN = frozenset({"spark", "sc", "os", "hmac", "pyspark", "moto", "session", "Correlation", "PCA", "Metadata",
                     "m5", "m6i", "boto3", "np", "pd"})
# Variable names the docs use for instances of canestra classes, resolved as the class (`cfg.concern`).
INSTANCES = {"cfg": "Settings", "settings": "Settings"}
# Dotted words that are not code paths: audit event names of `canestra serve` (docs/serving.md).
NOT_CODE = frozenset({"serve.start", "serve.stop", "serve.requests", "serve.keys_not_reloaded"})


@dataclasses.dataclass(frozen=True)
class Problem:
    where: str
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


def _line(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


FENCE = re.compile(r"^```[^\n]*\n.*?^```[ \t]*$", re.S | re.M)


def _prose(text: str) -> str:
    """The text with fenced blocks blanked (same length, so line numbers stay)."""
    return FENCE.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)


# ---------------------------------------------------------------- (a) paths

PATH = re.compile(r"(?<![\w./<>~-])((?:[\w.-]+/)+[\w.-]*\w)(?![\w/<{*-])")
BARE_PY = re.compile(r"`(\w+\.py)`")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
NODE = re.compile(r"(?:tests/)?\b(test_\w+\.py)(?:::(\w+))?|(?<![\w:])::(test_\w+)")


@functools.cache
def _basenames() -> frozenset[str]:
    found = set()
    for top in (PKG, ROOT / "bench", ROOT / "tests", ROOT / ".ci", ROOT / "deploy"):
        if top.is_dir():
            found.update(p.name for p in top.rglob("*") if p.is_file())
    return frozenset(found)


@functools.cache
def _test_functions(name: str) -> frozenset[str] | None:
    path = ROOT / "tests" / name
    if not path.is_file():
        return None
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return frozenset(n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))


def _path_exists(token: str, base: Path) -> bool:
    token = token.rstrip(".")
    return any((root / token).exists() for root in (ROOT, PKG, SRC, base))


def check_paths(text: str, where: str, base: Path = ROOT / "docs") -> list[Problem]:
    problems = []
    for m in PATH.finditer(text):
        token = m.group(1).rstrip(".")
        first = token.split("/", 1)[0]
        suffix = token.rsplit(".", 1)[-1] if "." in token.rsplit("/", 1)[-1] else ""
        if first == "canestra":  # `canestra/calibration/`, `canestra/tracking.py`: the package folder
            token, first = "src/" + token, "src"
        if suffix not in FILE_SUFFIXES or first not in REPO_DIRS + SUBPACKAGES:
            continue
        if first not in REPO_DIRS and suffix != "py":
            continue  # `model/canestra_model.json`: a folder canestra writes, not the package's model/
        if not _path_exists(token, base):
            problems.append(Problem(f"{where}:{_line(text, m.start())}", f"no such file: {token}"))
    for m in BARE_PY.finditer(text):
        if m.group(1) not in _basenames():
            problems.append(Problem(f"{where}:{_line(text, m.start())}", f"no file named {m.group(1)} in the tree"))
    for m in LINK.finditer(text):
        target = m.group(1)
        if "://" not in target and not target.startswith("mailto:") and not (base / target).exists():
            problems.append(Problem(f"{where}:{_line(text, m.start())}", f"broken link: {target}"))
    last = None
    for m in NODE.finditer(text):
        file, name, continued = m.groups()
        if file:
            last = file
            if _test_functions(file) is None:
                problems.append(Problem(f"{where}:{_line(text, m.start())}", f"no test file tests/{file}"))
                continue
        else:
            file, name = last, continued
        if name and file and (_test_functions(file) or frozenset()) and name not in _test_functions(file):
            problems.append(Problem(f"{where}:{_line(text, m.start())}", f"no test {name} in tests/{file}"))
    return problems


# ---------------------------------------------------------------- (b) dotted names


@dataclasses.dataclass
class _Module:
    names: set[str]
    classes: dict[str, set[str]]
    imported: dict[str, tuple[str, str]]  # alias -> (canestra module, name)


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level(body: list[ast.stmt]) -> list[ast.stmt]:
    """Statements at module level, also inside top-level ``if``/``try`` (``if TYPE_CHECKING:``)."""
    out = []
    for node in body:
        out.append(node)
        if isinstance(node, ast.If):
            out += _top_level(node.body) + _top_level(node.orelse)
        elif isinstance(node, ast.Try):
            out += _top_level(node.body) + _top_level(node.orelse)
    return out


def _targets(node: ast.stmt) -> list[str]:
    if isinstance(node, ast.Assign):
        return [t.id for t in node.targets if isinstance(t, ast.Name)]
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return [node.target.id]
    return []


@functools.cache
def _modules() -> dict[str, _Module]:
    mods = {}
    for path in sorted(PKG.rglob("*.py")):
        name = _module_name(path)
        mod = _Module(set(), {}, {})
        for node in _top_level(ast.parse(path.read_text(encoding="utf-8")).body):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                mod.names.add(node.name)
            elif isinstance(node, ast.ClassDef):
                mod.names.add(node.name)
                members = set()
                for inner in node.body:
                    if isinstance(inner, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                        members.add(inner.name)
                    members.update(_targets(inner))
                mod.classes[node.name] = members
            elif isinstance(node, ast.ImportFrom) and node.module:
                for alias in node.names:
                    mod.names.add(alias.asname or alias.name)
                    if node.module.startswith("canestra"):
                        mod.imported[alias.asname or alias.name] = (node.module, alias.name)
            for target in _targets(node):
                mod.names.add(target)
                if target == "_EXPORTS" and isinstance(node.value, ast.Dict):  # lazy exports (canestra/__init__)
                    for key, value in zip(node.value.keys, node.value.values):
                        if isinstance(key, ast.Constant) and isinstance(value, ast.Constant):
                            mod.names.add(key.value)
                            mod.imported[key.value] = (value.value, key.value)
        mods[name] = mod
    return mods


def _resolve_in(module: str, rest: list[str], depth: int = 0) -> bool:
    mods = _modules()
    if not rest:
        return True
    if depth > 5 or module not in mods:
        return False
    head, tail = rest[0], rest[1:]
    if f"{module}.{head}" in mods:
        return _resolve_in(f"{module}.{head}", tail, depth + 1)
    mod = mods[module]
    if head in mod.imported:
        source, name = mod.imported[head]
        if f"{source}.{name}" in mods:  # `from canestra.storage import files`
            return _resolve_in(f"{source}.{name}", tail, depth + 1)
        return _resolve_in(source, [name, *tail], depth + 1)
    if head not in mod.names:
        return False
    if not tail:
        return True
    return head in mod.classes and len(tail) == 1 and tail[0] in mod.classes[head]


def canestra_first_parts() -> frozenset[str]:
    mods = _modules()
    return frozenset({name.rsplit(".", 1)[-1] for name in mods}
                     | {cls for mod in mods.values() for cls in mod.classes})


def resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    mods = _modules()
    if parts[0] == "canestra":
        return _resolve_in("canestra", parts[1:])
    for name, mod in mods.items():
        if name.rsplit(".", 1)[-1] == parts[0] and _resolve_in(name, parts[1:]):
            return True
        if parts[0] in mod.classes and len(parts) == 2 and parts[1] in mod.classes[parts[0]]:
            return True
    return False


INLINE = re.compile(r"`([^`\n]+)`")
DOTTED = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+")


def _block_variables(text: str) -> set[str]:
    """Names a page's ```python blocks assign (``run``, ``preds``, ``answer``): `run.metrics` is not a module."""
    names: set[str] = set()
    for m in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M):
        for node in ast.walk(ast.parse(m.group(1))):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
    return names


def check_names(text: str, where: str) -> list[Problem]:
    problems = []
    local = _block_variables(text)
    ours = canestra_first_parts()
    prose = _prose(text)
    for m in INLINE.finditer(prose):
        token = re.sub(r"(\(.*\)|\[.*\])+$", "", m.group(1).strip())
        if not DOTTED.fullmatch(token) or token in NOT_CODE:
            continue
        if token.split(".")[0] in INSTANCES:
            token = INSTANCES[token.split(".")[0]] + token[len(token.split(".")[0]):]
        first, last = token.split(".")[0], token.rsplit(".", 1)[-1]
        if last in FILE_SUFFIXES or first in local or first in FOREIGN:
            continue
        at = f"{where}:{_line(prose, m.start())}"
        if first != "canestra" and first not in ours:
            problems.append(Problem(at, f"`{token}`: {first} is no canestra module or class (moved? if it is not "
                                        "canestra code, add it to FOREIGN in tests/test_docs_truth.py)"))
        elif not resolves(token):
            problems.append(Problem(at, f"`{token}` does not resolve in src/canestra"))
    return problems


ENV = re.compile(r"\bCANESTRA_[A-Z0-9_]*[A-Z0-9](?![<*A-Za-z0-9_])")


@functools.cache
def _code_text() -> str:
    return "\n".join(p.read_text(encoding="utf-8", errors="replace")
                     for top in (PKG, ROOT / "bench", ROOT / "tests", ROOT / ".ci") if top.is_dir()
                     for p in sorted(top.rglob("*.py")) if p.name != "test_docs_truth.py")


def check_env_vars(text: str, where: str) -> list[Problem]:
    """A ``CANESTRA_X`` the docs name is a Settings field or appears in the code (src, bench, tests, .ci)."""
    fields = {f.name for f in dataclasses.fields(Settings)}
    problems = []
    for m in ENV.finditer(text):
        name = m.group(0)
        if name[len(Settings._ENV_PREFIX):].lower() not in fields and name not in _code_text():
            problems.append(Problem(f"{where}:{_line(text, m.start())}", f"{name} is read nowhere in the code"))
    return problems


# ---------------------------------------------------------------- (c) defaults


def _leaf_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    out = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                out += _leaf_parsers(sub)
    return out


@functools.cache
def _parsers() -> tuple[argparse.ArgumentParser, ...]:
    return tuple(_leaf_parsers(commands.build_parser()))


@functools.cache
def default_table() -> dict[str, frozenset]:
    """``--flag`` and ``CANESTRA_X`` -> the default value(s) the code has (a flag may differ per command)."""
    settings = Settings()
    fields = {f.name for f in dataclasses.fields(Settings)}
    table: dict[str, set] = {}
    for parser in _parsers():
        for action in parser._actions:
            if not action.option_strings or action.default == argparse.SUPPRESS:
                continue
            if action.dest in fields:
                value = getattr(settings, action.dest)
            elif action.default is not None and not isinstance(action.default, (bool, list)):
                value = action.default
            else:
                continue
            for flag in action.option_strings:
                if flag.startswith("--"):
                    table.setdefault(flag, set()).add(value)
    for name in fields:
        table.setdefault(Settings._ENV_PREFIX + name.upper(), set()).add(getattr(settings, name))
    return {k: frozenset(v) for k, v in table.items()}


NUMBER = r"[0-9][0-9,]*(?:\.[0-9]+)?(?:e-?[0-9]+)?"
VALUE = rf"`?(?P<value>\d+\.\d+\.\d+\.\d+|{NUMBER}(?:\s*\+\s*{NUMBER})*|fp32|int8|local\[\*\]|[0-9]+(?:\.[0-9]+)?s)`?"
KEY = r"`?(?P<key>--[a-z][a-z0-9-]*|CANESTRA_[A-Z0-9_]+)"
# After the key, up to the word "default", in the same clause: no other flag, no ';', no sentence end.
CLAUSE = r"(?:(?!--[a-z]|CANESTRA_|;|\.\s|\n\n)[^\n])*?"
DEFAULT_FORMS = (
    # --flag (default 4)  /  --flag, default 0.005  /  --flag … (default 30 s)  /  CANESTRA_X … (default 4
    re.compile(KEY + r"[\s`]" + CLAUSE + r"\bdefaults?\b(?: is| of)?:?\s+" + VALUE + r"(?!\.?\d|[\w×x*/-]|\s*[×x]\s)"),
    re.compile(KEY + r"[\s`]" + CLAUSE + r"\bdefaults to\s+" + VALUE + r"(?!\.?\d|[\w×x*/-]|\s*[×x]\s)"),
    # --image-size (`160,224` default  /  --image-size … 224 (default)
    re.compile(KEY + r"`?\s*\(" + VALUE + r"\s+\(?default\b"),
    re.compile(KEY + r"[\s`]" + CLAUSE + r"(?<![\w.,])" + VALUE + r"\s+\(default\)"),
    # the default is `--task-threads 1`
    re.compile(r"\bdefault is\s+" + KEY + r"[ =]" + VALUE + r"(?![\w.])"),
)


def _parse_value(text: str):
    text = text.strip("`").replace(" ", "")
    if text.endswith("s") and text[:-1].replace(".", "").isdigit():
        return text  # a duration such as 10s, compared as written
    if re.fullmatch(rf"{NUMBER}(\+{NUMBER})*", text) and ("+" in text or re.fullmatch(r"\d+(,\d+)+", text)):
        try:
            return parse_sizes(text)  # 160 + 224 / 160,224: several image sizes
        except Exception:
            pass
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return text


def _matches(stated, actual) -> bool:
    if isinstance(actual, tuple):
        stated = (int(stated),) if isinstance(stated, float) and stated.is_integer() else stated
        return stated == actual
    if isinstance(actual, bool) or actual is None:
        return False
    if isinstance(actual, (int, float)) and isinstance(stated, float):
        return abs(float(actual) - stated) <= 1e-12 * max(1.0, abs(stated))
    return str(stated) == str(actual)


def check_defaults(text: str, where: str, table: dict | None = None) -> list[Problem]:
    table = default_table() if table is None else table
    problems = []
    seen = set()
    for form in DEFAULT_FORMS:
        for m in form.finditer(text):
            key, value = m.group("key"), m.group("value")
            if key not in table or (m.start("value"), key) in seen:
                continue
            seen.add((m.start("value"), key))
            actual = table[key]
            if any(v is None for v in actual) and len(actual) == 1:
                continue  # no default to compare with (e.g. --older-than)
            stated = _parse_value(value)
            if not any(_matches(stated, a) for a in actual):
                shown = " or ".join(sorted(repr(a) for a in actual))
                problems.append(Problem(f"{where}:{_line(text, m.start())}",
                                        f"{key}: the text says default {value!r}, the code has {shown}"))
    for row in _table_rows(text):
        line, key, value = row
        if key in table and value and not any(_matches(_parse_value(value), a) for a in table[key]):
            if re.fullmatch(rf"`?{NUMBER}`?(\s*(s|MB|px))?|`?(fp32|int8|local\[\*\]|\d+s|\d+\.\d+\.\d+\.\d+)`?", value):
                shown = " or ".join(sorted(repr(a) for a in table[key]))
                problems.append(Problem(f"{where}:{line}", f"{key}: the table says default {value!r}, the code has "
                                                           f"{shown}"))
    return problems


def _table_rows(text: str):
    """(line, flag or env var, default cell) of every Markdown table with a 'Default' column."""
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        cells = [c.strip().lower() for c in lines[i].strip().strip("|").split("|")]
        if lines[i].lstrip().startswith("|") and "default" in cells:
            col = cells.index("default")
            i += 2  # header and |---| row
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                row = [c.strip() for c in lines[i].strip().strip("|").split("|")]
                keys = re.findall(r"--[a-z][a-z0-9-]*|CANESTRA_[A-Z0-9_]+", " ".join(row[:col]))
                if keys and col < len(row):
                    value = re.sub(r"\s*\(.*\)$", "", row[col]).strip()
                    yield i + 1, keys[0], value
                i += 1
        i += 1


# Sentences that call an image size or a feature dimension the (current) default.
DATED = re.compile(r"\b(old|older|former|previous|then|was|were|until|before|20\d\d-\d\d-\d\d)\b", re.I)
SIZE_CLAIMS = (
    re.compile(r"\bdefaults?\b[^.;:\n(]{0,40}?\b(?P<px>\d{2,4}(?:\s*\+\s*\d{2,4})*) px"),
    re.compile(r"\b(?P<px>\d{2,4}(?:\s*\+\s*\d{2,4})*) px\)?,? (?:is |are )?(?:the |canestra's )?(?:\()?default\b"),
)


def check_size_claims(text: str, where: str) -> list[Problem]:
    default = Settings().image_sizes
    problems = []
    for pattern in SIZE_CLAIMS:
        for m in pattern.finditer(text):
            start = text.rfind("\n", 0, m.start()) + 1
            clause = text[max(start, m.start() - 60):m.end() + 25]
            if DATED.search(clause):
                continue
            sizes = tuple(int(s) for s in re.findall(r"\d+", m.group("px")))
            if sizes != default:
                problems.append(Problem(f"{where}:{_line(text, m.start())}",
                                        f"calls {m.group('px')} px the default; Settings has {default}"))
    return problems


def feature_dim() -> int:
    tree = ast.parse((PKG / "vision" / "backbone.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if "FEATURE_DIM" in _targets(node):
            return int(ast.literal_eval(node.value))  # type: ignore[attr-defined]
    raise AssertionError("no FEATURE_DIM in vision/backbone.py")


def check_readme_dimension(text: str, where: str) -> list[Problem]:
    """The README's data flow states the default features' width."""
    dim = feature_dim() * len(Settings().image_sizes)
    problems = []
    for m in re.finditer(r"features/\s*\(.*?(\d[\d,]*)-d vector", text):
        if int(m.group(1).replace(",", "")) != dim:
            problems.append(Problem(f"{where}:{_line(text, m.start())}",
                                    f"features/ holds {dim}-d vectors by default, the text says {m.group(1)}-d"))
    return problems


# ---------------------------------------------------------------- the tests


def _docs() -> list[tuple[str, str]]:
    return [(p.relative_to(ROOT).as_posix(), p.read_text(encoding="utf-8")) for p in DOCS]


@pytest.mark.parametrize("where, text", _docs(), ids=[w for w, _ in _docs()])
def test_named_paths_and_tests_exist(where, text):
    problems = check_paths(text, where)
    assert not problems, "\n".join(map(str, problems))


def test_pyproject_comments_name_existing_files():
    comments = "\n".join(line.split("#", 1)[1] if "#" in line else "" for line in PYPROJECT.read_text().split("\n"))
    problems = check_paths(comments, "pyproject.toml", base=ROOT)
    assert not problems, "\n".join(map(str, problems))


@pytest.mark.parametrize("where, text", _docs(), ids=[w for w, _ in _docs()])
def test_named_modules_and_functions_resolve(where, text):
    problems = check_names(text, where)
    assert not problems, "\n".join(map(str, problems))


@pytest.mark.parametrize("where, text", _docs(), ids=[w for w, _ in _docs()])
def test_named_environment_variables_exist(where, text):
    problems = check_env_vars(text, where)
    assert not problems, "\n".join(map(str, problems))


@pytest.mark.parametrize("where, text", _docs(), ids=[w for w, _ in _docs()])
def test_stated_defaults_match_the_code(where, text):
    problems = check_defaults(text, where) + check_size_claims(text, where)
    if where == "README.md":
        problems += check_readme_dimension(text, where)
    assert not problems, "\n".join(map(str, problems))


def test_help_texts_state_the_defaults_the_code_has():
    problems = []
    for parser in _parsers():
        for action in parser._actions:
            if action.option_strings and action.help and action.help != argparse.SUPPRESS:
                flag = action.option_strings[-1]
                own = {k: v for k, v in default_table().items() if k in action.option_strings}
                problems += check_defaults(f"{flag} {action.help}", f"{parser.prog} {flag}", own)
    assert not problems, "\n".join(map(str, problems))


def test_the_checkers_see_the_forms_they_claim_to():
    """Known-good snippets pass (no false alarms on the forms the docs use)."""
    table = default_table()
    good = ("`--augment-views N` (default 4); `--pca-k`, default 512, or `--pca-variance 0.95`; "
            "`--image-size` (`224` default; `160`); `--drain-timeout` (default 30 s). "
            "`CANESTRA_S3_MAX_ATTEMPTS` tries per request (default 4, the first included). "
            "`--worker-decoded-mb` (default 4 × `--max-decoded-mb`). `--trigger` (default 10s). "
            "So the default is `--task-threads 1`.")
    assert check_defaults(good, "good", table) == []
    assert check_size_claims("the default 224 px features; the old default (160 px, PCA 256)", "good") == []
    assert check_names("`pipeline.features.update_views`, `canestra.api.train`, `storage.files.list_images`, "
                       "`erase._traces`, `s3.S3Options.sse_kwargs`, `Settings.image_sizes`, `cfg.image_sizes`, `canestra.InputError`, "
                       "`cli.main`, `spark.driver.memory`, `metrics.json`", "good") == []
    assert check_paths("`src/canestra/pipeline/features.py`, `privacy/erase.py`, `bench/tuning.py`, "
                       "`tests/test_docs_truth.py::test_the_checkers_see_the_forms_they_claim_to`", "good") == []


def test_positive_controls_each_checker_flags_a_known_bad_snippet():
    table = default_table()
    # (c) defaults: every form, each with a wrong value
    bad_defaults = {
        "`--augment-views N` (default 3)": "--augment-views",
        "`--pca-k`, default 256, or": "--pca-k",
        "`--image-size` (`160,224` default; `100`)": "--image-size",
        "`--max-iter` defaults to 100.": "--max-iter",
        "so the default is `--task-threads 2` with local[*]": "--task-threads",
        "`CANESTRA_S3_MAX_ATTEMPTS` tries per request (default 5": "CANESTRA_S3_MAX_ATTEMPTS",
        "| Flag | Env var | Default | Meaning |\n|---|---|---|---|\n| `--port` | `CANESTRA_PORT` | 8080 | port |": "--port",
        "`--image-size` 160 (default), 224": "--image-size",
        "`--trigger` (default 5s)": "--trigger",
    }
    for snippet, key in bad_defaults.items():
        found = check_defaults(snippet, "bad", table)
        assert found and key in found[0].what, (snippet, found)
    assert check_size_claims("**Input size**: 160 px is the default for accuracy", "bad")
    assert check_size_claims("with the default 160 + 224 px features", "bad")
    assert check_readme_dimension("features/  (image_id, label, split, view, 2560-d vector)", "bad")
    # (b) names: a retired module, a missing function, a missing class member, a bad canestra.* path
    for token in ("`training.featurize_table`", "`prediction.predict(include_paths=…)`", "`gdpr._location`",
                  "`pipeline.features.no_such_function`", "`s3.S3Options.no_such_method`",
                  "`canestra.api.no_such_name`", "`canestra.nowhere`", "`storage.list_images`", "`cfg.no_such_field`"):
        assert check_names(token, "bad"), token
    assert check_env_vars("`CANESTRA_NO_SUCH_VARIABLE`", "bad")
    assert not check_env_vars("`CANESTRA_PORT`, `CANESTRA_ACTOR`, `CANESTRA_<NAME>`", "good")
    # (a) paths: a moved module, a package-relative path, a bare file name, a test and a link that do not exist
    for snippet in ("`src/canestra/s3.py`", "`pipeline/no_such.py`", "`gdpr.py`",
                    "`tests/test_erase.py::test_no_such_test`", "`test_no_such_file.py`",
                    "`test_erase.py::test_erase_covers_the_error_gallery`, `::test_no_such_test`",
                    "[x](no-such-page.md)", "(src/canestra/s3.py)"):
        assert check_paths(snippet, "bad"), snippet
