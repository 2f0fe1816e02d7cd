"""`canestra <command> --help`: every command and subcommand shows an example, the CANESTRA_*
variable of each flag backed by Settings, no duplicated flag definitions, and is listed in
the README; the old `--threads` spellings still work."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import re
from pathlib import Path

import pytest

from canestra.cli import commands
from canestra.config import Settings

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def _commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every leaf command (``train``, ``gdpr record``, ``deploy aws`` ...) with its parser."""
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                inner = _commands(sub, (*prefix, name))
                out += inner or [((*prefix, name), sub)]
    return out


COMMANDS = _commands(commands.build_parser())
NAMES = [" ".join(c) for c, _ in COMMANDS]


def test_the_command_list_is_complete():
    assert {"ingest", "train", "predict", "evaluate", "watch", "erase", "purge", "gdpr record", "serve",
            "deploy aws"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_help_shows_an_example_and_is_in_the_readme(name, capsys):
    with pytest.raises(SystemExit) as stop:
        commands.main([*name.split(), "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: canestra {name}")
    # The example is a runnable command line of this very command.
    example = out.split("example:", 1)[1] if "example:" in out else ""
    assert re.search(rf"^\s+canestra {re.escape(name)}( |$)", example, re.M), out
    assert f"canestra {name}" in README, f"README does not mention `canestra {name}`"


@pytest.mark.parametrize("name", NAMES)
def test_each_settings_flag_names_its_environment_variable(name):
    parser = dict(zip(NAMES, (p for _, p in COMMANDS)))[name]
    fields = {f.name for f in dataclasses.fields(Settings)}
    text = parser.format_help()
    flat = re.sub(r"\s+", " ", text)
    shown = [a for a in parser._actions if a.option_strings and a.help != argparse.SUPPRESS]
    for action in shown:
        env = f"CANESTRA_{action.dest.upper()}"
        if action.dest in fields:
            assert f"{env}" in flat, f"{name} {action.option_strings[0]}: no {env} in --help"
        assert action.metavar or action.nargs == 0 or action.choices or action.option_strings == ["-h", "--help"], (
            f"{name} {action.option_strings[0]} has no metavar")
    flags = [s for a in parser._actions for s in a.option_strings]
    assert len(flags) == len(set(flags))


def _declarations() -> dict[str, list[str]]:
    """``--flag`` -> where an ``add_argument("--flag", …)`` call declares it, over all of src/canestra (ast)."""
    found: dict[str, list[str]] = {}
    src = Path(commands.__file__).resolve().parents[1]
    for path in sorted(src.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "add_argument" and node.args
                    and isinstance(node.args[0], ast.Constant) and str(node.args[0].value).startswith("--")):
                found.setdefault(node.args[0].value, []).append(f"{path.relative_to(src)}:{node.lineno}")
    return found


# Flags several commands share come from one parent parser (cli/options.py), declared exactly once.
# (--images and --out are declared per parent on purpose: their help differs between train and predict;
# deploy aws has its own --allow-non-eu-region and --allow-http-endpoint.)
SHARED_FLAGS = ("--debug", "--seed", "--master", "--quiet", "--audit-log", "--test-fraction", "--s3-endpoint-url",
                "--sse-kms-key-id", "--image-size",
                "--batch-size", "--include-paths")


def test_debug_and_shared_flags_are_declared_once():
    declared = _declarations()
    assert len(declared) >= 40, f"found only {len(declared)} flag declarations: is the scan still looking at the CLI?"
    for flag in SHARED_FLAGS:
        assert len(declared.get(flag, [])) == 1, f"{flag} declared {len(declared.get(flag, []))} times: {declared.get(flag)}"
    # each of those is a flag of several commands, so declaring it once means a shared parent
    parsers = [p for _, p in COMMANDS]
    for flag in ("--debug", "--master", "--audit-log", "--s3-endpoint-url"):
        assert sum(flag in p._option_string_actions for p in parsers) >= 4, flag


def test_threads_flags_have_distinct_names_and_the_old_spelling_still_works():
    parser = commands.build_parser()
    train = parser.parse_args(["train", "--images", "x", "--out", "y", "--task-threads", "3"])
    old_train = parser.parse_args(["train", "--images", "x", "--out", "y", "--threads", "3"])
    assert train.threads == old_train.threads == 3
    serve = parser.parse_args(["serve", "--model", "m", "--worker-threads", "2"])
    old_serve = parser.parse_args(["serve", "--model", "m", "--threads", "2"])
    assert serve.serve_threads == old_serve.serve_threads == 2
    assert getattr(serve, "threads", None) is None  # serve's threads never reach the Spark setting
    helps = {name: p.format_help() for name, p in zip(NAMES, (p for _, p in COMMANDS))}
    assert "--task-threads" in helps["train"] and "--worker-threads" in helps["serve"]
    assert not re.search(r"--threads\b", helps["train"] + helps["serve"])  # hidden aliases
