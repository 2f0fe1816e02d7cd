"""Families: the shipped Fruits-360 table, the fallback rule, user tables and their errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from canestra.answer.taxonomy import family_label, is_family_label, load_taxonomy
from canestra.errors import InputError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "fruits-360-sample" / "Training"


@pytest.mark.parametrize("cls, family", [
    ("Apple Red 2", "Apple"), ("Apple Golden 3", "Apple"), ("Banana Lady Finger", "Banana"),
    ("Limes", "Lime"), ("Cocos", "Coconut"), ("Maracuja", "Passion Fruit"), ("Passion Fruit", "Passion Fruit"),
    ("Granadilla", "Passion Fruit"), ("Nut Forest", "Hazelnut"), ("Nut Pecan", "Pecan"), ("Kaki", "Persimmon"),
    ("Potato Sweet", "Sweet Potato"), ("Potato Red Washed", "Potato"), ("Clementine", "Mandarin"),
    ("Cantaloupe 2", "Melon"), ("Redcurrant", "Currant"), ("Pepper Red", "Pepper"), ("Onion White", "Onion"),
    ("apple red 2", "Apple"),  # case-insensitive
])
def test_shipped_table_names_the_families_that_need_care(cls, family):
    assert load_taxonomy().family(cls) == family


def test_every_class_of_the_samples_is_in_the_table_not_guessed(sample_dir):
    tax = load_taxonomy()
    classes = [p.name for p in sample_dir.iterdir() if p.is_dir()]
    if SHARED.is_dir():
        classes += [p.name for p in SHARED.iterdir() if p.is_dir()]
    missing = [c for c in classes if c.lower() not in tax.rows]
    assert not missing, f"classes without a row in conf/taxonomy.csv: {missing}"


def test_unlisted_classes_get_a_family_by_rule():
    tax = load_taxonomy()
    assert tax.family("Apple Red 4") == "Apple"  # first word is a known family
    assert tax.family("Dragonfruit 2") == "Dragonfruit"  # else: the name without its number
    assert tax.family(family_label("Apple")) == "Apple"
    assert is_family_label("Banana (family)") and not is_family_label("Banana")


def test_family_roots_are_told_from_variety_roots(sample_dir):
    tax = load_taxonomy()
    assert tax.is_family_root(["Apple", "Banana", "Orange"])
    assert tax.is_family_root(["apple", "banana"])  # any case
    assert not tax.is_family_root([p.name for p in sample_dir.iterdir() if p.is_dir()])
    assert not tax.is_family_root(["Apple", "Spaceship"])


def test_a_user_table_overrides_and_extends(tmp_path):
    f = tmp_path / "tax.csv"
    f.write_text("class,family\nLimes,Citrus\nDragonfruit 2,Pitahaya\n", encoding="utf-8")
    tax = load_taxonomy(str(f))
    assert tax.family("Limes") == "Citrus"
    assert tax.family("Dragonfruit 2") == "Pitahaya"
    assert tax.family("Apple Red 2") == "Apple"  # shipped rows stay


@pytest.mark.parametrize("content, message", [
    ("name,kind\nLimes,Lime\n", "needs the columns class,family (missing: class, family"),
    ("class\nLimes\n", "missing: family"),
    ("class,family\nLimes,Lime\nLimes,Citrus\n", "given two families"),
    ("class,family\nLimes,\n", "line 2: both class and family must be filled in"),
    ("class,family\n", "has no rows"),
])
def test_bad_user_tables_are_plain_errors(tmp_path, content, message):
    f = tmp_path / "tax.csv"
    f.write_text(content, encoding="utf-8")
    with pytest.raises(InputError, match=message.replace("(", r"\(")):
        load_taxonomy(str(f))


def test_missing_table_is_a_plain_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_taxonomy(str(tmp_path / "nope.csv"))


@pytest.mark.parametrize("content", [None, "name,kind\nLimes,Lime\n"])
def test_cli_taxonomy_errors_exit_2_before_spark(tmp_path, sample_dir, content):
    tax = tmp_path / "tax.csv"
    if content is not None:
        tax.write_text(content, encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "canestra.cli", "train", "--images", str(sample_dir),
                           "--out", str(tmp_path / "out"), "--taxonomy", str(tax)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("canestra: error: taxonomy file"), proc.stderr
    assert ("does not exist" if content is None else "class,family") in lines[0]
    assert not (tmp_path / "out" / "model").exists()
