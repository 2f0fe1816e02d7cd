"""Settings split per concern (config.CONCERNS), and the API's keywords: each function takes the
concerns it uses, anything else is refused with one plain line that says where it belongs, and
every flag a message names is one ``canestra <command> --help`` shows. No Spark is started here:
each refusal happens before a JVM would."""

from __future__ import annotations

import argparse
import contextvars
import dataclasses
import inspect
import re
from pathlib import Path

import pytest

import canestra
from canestra import api, config
from canestra.cli import commands
from canestra.config import CONCERNS, Settings

DOC = (Path(__file__).resolve().parents[1] / "docs" / "python-api.md").read_text(encoding="utf-8")
FIELDS = [f.name for f in dataclasses.fields(Settings)]
FUNCTIONS = ("ingest", "train", "predict", "evaluate", "watch")


def _parsers(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, (*prefix, name))
    if prefix:
        yield " ".join(prefix), parser


# command -> {visible flag: dest}
VISIBLE = {name: {s: a.dest for a in p._actions if a.help != argparse.SUPPRESS for s in a.option_strings}
           for name, p in _parsers(commands.build_parser())}


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    for name in FIELDS:
        monkeypatch.delenv(f"CANESTRA_{name.upper()}", raising=False)


def _call(fn: str, tmp_path: Path, **kw):
    """Call canestra.<fn> on paths that do not exist: a keyword refusal must come first."""
    images, out = str(tmp_path / "no-images"), str(tmp_path / "out")
    if fn in ("ingest", "train"):
        return getattr(canestra, fn)(images, out, **kw)
    extra = {"once": True} if fn == "watch" else {}
    return getattr(canestra, fn)(str(tmp_path / "no-model"), images, out, **extra, **kw)


# ---------------------------------------------------------------------------- the split


def test_concerns_cover_every_field_once_in_declaration_order():
    flat = [name for names in CONCERNS.values() for name in names]
    assert flat == FIELDS  # once each, and config.py declares the fields grouped by concern
    assert set(CONCERNS) == {"spark", "featurizer", "data", "model", "serving", "storage", "privacy", "output"}
    assert CONCERNS["serving"][:2] == ("host", "port") and "s3_endpoint_url" in CONCERNS["storage"]


def test_each_concern_is_a_typed_view_of_settings():
    cfg = Settings.load(pca_k=32, port=9000)
    assert cfg.concern("model")["pca_k"] == 32 and cfg.concern("serving")["port"] == 9000
    assert list(cfg.concern("spark")) == list(CONCERNS["spark"])
    for name, keys in CONCERNS.items():  # the keyword types of each concern, for type checkers
        assert tuple(config.OPTIONS[name].__annotations__) == keys
    with pytest.raises(canestra.InputError, match="unknown concern 'gpu'.*spark"):
        cfg.concern("gpu")


def test_each_function_takes_the_concerns_it_uses():
    assert api.TAKES["train"] == ("spark", "featurizer", "data", "model", "storage", "output")
    assert api.TAKES["ingest"] == ("spark", "data", "storage", "output")
    for fn in ("predict", "evaluate", "watch"):  # the saved model carries its featurizer and model settings
        assert api.TAKES[fn] == ("spark", "storage", "output")
    for fn in FUNCTIONS:
        expected = [k for c in api.TAKES[fn] for k in CONCERNS[c]]
        assert list(api.keywords(fn)) == expected
        assert list(api.OPTIONS[fn].__annotations__) == expected  # the typed **kwargs


# ---------------------------------------------------------------------------- Settings.load


@pytest.mark.parametrize("name", ["as_dict", "_ENV_PREFIX", "load", "concern"])
def test_load_refuses_a_name_that_is_no_field(name):
    with pytest.raises(canestra.InputError, match=f"unknown setting {name}"):
        Settings.load(**{name: 1})


def test_load_suggests_the_field_a_misspelling_meant():
    with pytest.raises(canestra.InputError, match=r"^unknown setting pca_kk \(did you mean pca_k\?\)$"):
        Settings.load(pca_kk=32)


@pytest.mark.parametrize("overrides", [
    {"pca_k": 0}, {"pca_variance": 2.0}, {"test_fraction": 1.0}, {"augment_views": 40}, {"batch_size": 0},
    {"threads": 0}, {"arrow_batch": 0}, {"precision": "fp16"}, {"unknown_quantile": 0.7},
    {"s3_max_attempts": 0}, {"retention_days": -1}, {"pca_k": "many"},
])
def test_load_messages_name_shown_flags_or_the_variable(overrides):
    (name,) = overrides
    with pytest.raises(canestra.InputError) as err:
        Settings.load(**overrides)
    message = str(err.value)
    flags = re.findall(r"--[a-z][a-z0-9-]*", message)
    shown = {flag: dest for flags_ in VISIBLE.values() for flag, dest in flags_.items()}
    for flag in flags:
        assert flag in shown and shown[flag] in FIELDS, f"{message!r} names {flag}, which no --help shows"
    assert flags or f"CANESTRA_{name.upper()}" in message, message
    assert f"CANESTRA_{name.upper()}" in message  # the value may have come from the variable


def test_the_flag_table_matches_the_parser():
    for name, (command, flag) in config.FLAGS.items():
        assert VISIBLE[command].get(flag) == name, f"{name}: `canestra {command}` shows no {flag}"
    for command, flags in VISIBLE.items():  # and every Settings flag is in the table
        for flag, dest in flags.items():
            if dest in FIELDS:
                assert config.FLAGS[dest][1] == flag, (command, flag)
    assert "--task-threads" == config.FLAGS["threads"][1]  # not the hidden --threads


# ---------------------------------------------------------------------------- the API's keywords


def test_a_serving_keyword_to_train_is_refused_plainly(tmp_path):
    with pytest.raises(canestra.InputError) as err:
        canestra.train(str(tmp_path / "images"), str(tmp_path / "out"), port=1)
    message = str(err.value)
    assert message == ("port is a serving setting, which canestra.train does not take: "
                       "it is for `canestra serve --port` (or CANESTRA_PORT)")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fn", FUNCTIONS)
def test_a_misspelled_keyword_gets_a_suggestion(fn, tmp_path):
    with pytest.raises(canestra.InputError, match=r"^unknown setting mastr \(did you mean master\?\)$"):
        _call(fn, tmp_path, mastr="local[1]")


def test_a_misspelled_parameter_is_suggested_too(tmp_path):
    with pytest.raises(canestra.InputError, match=r"unknown setting pca_kk \(did you mean pca_k\?\)"):
        canestra.train(str(tmp_path), str(tmp_path / "out"), pca_kk=32)
    with pytest.raises(canestra.InputError, match=r"unknown setting mlfow \(did you mean mlflow\?\)"):
        canestra.train(str(tmp_path), str(tmp_path / "out"), mlfow=True)


@pytest.mark.parametrize("fn, keyword, where", [
    ("predict", "pca_k", "canestra.train or `canestra train --pca-k` (or CANESTRA_PCA_K)"),
    ("evaluate", "image_sizes", "canestra.train or `canestra train --image-size` (or CANESTRA_IMAGE_SIZES)"),
    ("watch", "elastic_net", "canestra.train or `canestra train` with CANESTRA_ELASTIC_NET"),
    ("predict", "seed", "canestra.ingest, canestra.train or `canestra train --seed` (or CANESTRA_SEED)"),
    ("ingest", "pca_k", "canestra.train or `canestra train --pca-k` (or CANESTRA_PCA_K)"),
    ("ingest", "workers", "`canestra serve --workers` (or CANESTRA_WORKERS)"),
    ("train", "controller", "`canestra gdpr record` with CANESTRA_CONTROLLER"),
    ("train", "retention_days", "`canestra purge --older-than` (or CANESTRA_RETENTION_DAYS)"),
])
def test_a_keyword_of_another_concern_says_where_it_belongs(fn, keyword, where, tmp_path):
    with pytest.raises(canestra.InputError) as err:
        _call(fn, tmp_path, **{keyword: 1})
    message = str(err.value)
    concern = next(c for c, keys in CONCERNS.items() if keyword in keys)
    assert message.startswith(f"{keyword} is a {concern} setting, which canestra.{fn} does not take")
    assert message.endswith(f"it is for {where}") and "\n" not in message
    for flag in re.findall(r"`canestra ([a-z ]+?) (--[a-z-]+)`", message):
        assert flag[1] in VISIBLE[flag[0]], flag


def test_every_foreign_keyword_names_a_shown_flag_or_its_variable(tmp_path):
    for fn in FUNCTIONS:
        for name in FIELDS:
            if name in api.keywords(fn):
                continue
            with pytest.raises(canestra.InputError) as err:
                api._check_keywords(fn, {name: 1})
            message = str(err.value)
            for command, flag in re.findall(r"`canestra ([a-z ]+?) (--[a-z-]+)`", message):
                assert VISIBLE[command].get(flag) == name, message
            assert f"CANESTRA_{name.upper()}" in message, message


def test_a_whole_settings_object_is_still_taken_as_it_is():
    cfg = Settings.load(port=1, pca_k=32)  # a full configuration, as the CLI passes it

    def check():  # in a copied context: _settings sets the call's S3 options (a context variable)
        assert api._settings("predict", cfg, {}) is cfg
        merged = api._settings("predict", cfg, {"master": "local[1]"})
        assert (merged.master, merged.pca_k, merged.port) == ("local[1]", 32, 1)

    contextvars.copy_context().run(check)


# ---------------------------------------------------------------------------- documented and typed


@pytest.mark.parametrize("fn", FUNCTIONS)
def test_each_function_documents_and_types_its_keywords(fn):
    func = getattr(canestra, fn)
    doc = inspect.getdoc(func) or ""
    for name in api.keywords(fn):
        assert f"``{name}``" in doc, f"canestra.{fn}'s docstring does not list {name}"
    annotation = inspect.signature(func).parameters["overrides"].annotation
    assert annotation == f"Unpack[{api.OPTIONS[fn].__name__}]"


def test_the_python_api_page_lists_each_concern_and_who_takes_it():
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| (\w+) \|.*\|$", DOC, re.M)}
    for concern, keys in CONCERNS.items():
        assert concern in rows, f"docs/python-api.md has no row for the {concern} settings"
        for key in keys:
            assert f"`{key}`" in rows[concern], (concern, key)
        takers = [fn for fn in FUNCTIONS if concern in api.TAKES[fn]]
        for fn in FUNCTIONS:
            assert (f"`{fn}`" in rows[concern].rsplit("|", 2)[1]) == (fn in takers), (concern, fn)


def test_public_names_are_declared():
    assert {"Settings", "CONCERNS", "parse_sizes"} <= set(config.__all__)
    assert {"train", "predict", "evaluate", "ingest", "watch", "load_model", "TrainRun", "Predictions",
            "TrainOptions"} <= set(api.__all__)
    public = {n for n, v in vars(api).items() if not n.startswith("_") and inspect.isfunction(v)
              and v.__module__ == api.__name__}
    assert public <= set(api.__all__), sorted(public - set(api.__all__))
