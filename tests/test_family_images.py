"""`train --family-images`: a root of family folders is trained at family level even when every
folder is also a Fruits-360 class name (real photos of bananas and oranges alone would otherwise
merge with the studio's "Banana" and "Orange" varieties)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from canestra.answer.taxonomy import load_taxonomy
from canestra.errors import InputError
from canestra.pipeline.ingest import list_roots, make_listing

REAL = Path(__file__).resolve().parents[1] / "sample" / "real-photos"


@pytest.fixture
def bananas_and_oranges(tmp_path) -> Path:
    root = tmp_path / "shop"
    for fam in ("Banana", "Orange"):
        (root / fam).mkdir(parents=True)
        for p in sorted((REAL / fam).glob("*.jpg"))[:6]:
            shutil.copy(p, root / fam / p.name)
    return root


def test_a_root_of_class_named_family_folders_is_family_level_only_when_asked(bananas_and_oranges):
    tax = load_taxonomy(None)
    files, info = list_roots([str(bananas_and_oranges)], True, tax)
    assert info[0]["level"] == "variety" and {f.label for f in files} == {"Banana", "Orange"}
    files, info = list_roots([str(bananas_and_oranges)], True, tax, family_uris=[str(bananas_and_oranges)])
    assert info[0]["level"] == "family"
    assert {f.label for f in files} == {"Banana (family)", "Orange (family)"}


def test_a_listing_is_reused_only_for_the_same_family_roots(bananas_and_oranges):
    tax, root = load_taxonomy(None), str(bananas_and_oranges)
    listing = make_listing([root], True, tax, family_uris=[root])
    assert listing.fits([root], (), tax, [root])
    assert not listing.fits([root], (), tax)


def test_a_folder_that_names_no_family_is_refused_in_plain_words(bananas_and_oranges):
    (bananas_and_oranges / "Rocks").mkdir()
    shutil.copy(next((bananas_and_oranges / "Banana").iterdir()), bananas_and_oranges / "Rocks" / "r.jpg")
    with pytest.raises(InputError, match=r"--family-images .*Rocks names no family"):
        list_roots([str(bananas_and_oranges)], True, load_taxonomy(None), family_uris=[str(bananas_and_oranges)])
    # the CLI says so in one line, before any JVM starts
    done = subprocess.run([sys.executable, "-m", "canestra.cli", "train", "--images", str(REAL), "--family-images",
                           str(bananas_and_oranges), "--out", str(bananas_and_oranges.parent / "run")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "Rocks names no family" in done.stderr and "Traceback" not in done.stderr


def test_training_with_family_images_learns_family_classes(spark, tmp_path, sample_dir, bananas_and_oranges):
    from canestra import api

    run = api.train(str(sample_dir), str(tmp_path / "run"), spark=spark, quiet=True,
                    family_images=[str(bananas_and_oranges)], pca_k=16, image_sizes="100", max_iter=30,
                    shift_eval=False, mlflow=False)
    roots = run.metrics["roots"]
    assert [(r["level"], r["folders"]) for r in roots] == [("variety", 10), ("family", 2)]
    from canestra.pipeline.predict import load_model, model_labels

    labels = model_labels(load_model(run.model_path))
    assert {"Banana (family)", "Orange (family)", "Banana", "Orange"} <= set(labels)


def test_cli_ingest_catalogs_family_and_unknown_roots_as_train_reads_them(spark, tmp_path, sample_dir,
                                                                         bananas_and_oranges, capsys):
    """A data engineer ingests first, then trains: the catalog already holds the family-level classes and the
    "none of the families" rows, and the progress line says how each root was read."""
    from canestra import cli
    from canestra.answer.taxonomy import OTHER_LABEL

    other = tmp_path / "other"
    other.mkdir()
    for p in sorted((REAL / "Apple").glob("*.jpg"))[:3]:
        shutil.copy(p, other / p.name)
    out = tmp_path / "cat"
    assert cli.main(["ingest", "--images", str(sample_dir), "--family-images", str(bananas_and_oranges),
                     "--unknown-images", str(other), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "family-level (2 families)" in err and "none of the families (3 files, answered unknown)" in err
    labels = {r["label"] for r in spark.read.parquet(str(out / "catalog")).select("label").distinct().collect()}
    assert {"Banana (family)", "Orange (family)", OTHER_LABEL} <= labels
