"""The image tree is listed once per run: the pre-checks' listing goes on to the run (on S3 a
listing is thousands of paid requests, and a tree that changes in between would be read twice)."""

from __future__ import annotations

from pathlib import Path

import pytest

from canestra.cli import commands as cli
from canestra.storage import files as storage

FIXTURE_MODEL = Path(__file__).parent / "fixtures" / "model-0.1.0"


@pytest.fixture
def listings(monkeypatch):
    calls: list[str] = []
    real = storage.list_images

    def counting(uri, *args, **kwargs):
        calls.append(str(uri))
        return real(uri, *args, **kwargs)

    monkeypatch.setattr(storage, "list_images", counting)
    return calls


def _two_classes(sample_dir: Path, tmp_path: Path) -> Path:
    root = tmp_path / "images"
    root.mkdir()
    for c in sorted(p for p in sample_dir.iterdir() if p.is_dir())[:2]:
        (root / c.name).symlink_to(c)
    return root


def test_cli_predict_lists_the_tree_once(spark, sample_dir, tmp_path, listings):
    images = _two_classes(sample_dir, tmp_path)
    assert cli.main(["predict", "--model", str(FIXTURE_MODEL), "--images", str(images),
                     "--out", str(tmp_path / "out"), "--quiet"]) == 0
    assert listings == [str(images)]
    assert (tmp_path / "out" / "predictions.csv").read_text().count("\n") > 10


def test_cli_ingest_lists_the_tree_once(spark, sample_dir, tmp_path, listings):
    images = _two_classes(sample_dir, tmp_path)
    assert cli.main(["ingest", "--images", str(images), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    assert listings == [str(images)]


def test_api_predict_lists_the_tree_once(spark, sample_dir, tmp_path, listings):
    import canestra

    images = _two_classes(sample_dir, tmp_path)
    res = canestra.predict(str(FIXTURE_MODEL), str(images), str(tmp_path / "out"), quiet=True)
    assert listings == [str(images)] and res.predicted > 10


def test_a_listing_of_other_roots_is_not_reused(spark, sample_dir, tmp_path, listings):
    """The listing only stands in for the roots it was made of."""
    import canestra
    from canestra.pipeline.ingest import make_listing

    images = _two_classes(sample_dir, tmp_path)
    other = make_listing(str(sample_dir), require_labels=False)
    listings.clear()
    canestra.predict(str(FIXTURE_MODEL), str(images), str(tmp_path / "out"), quiet=True, listing=other, spark=spark)
    assert listings == [str(images)]
