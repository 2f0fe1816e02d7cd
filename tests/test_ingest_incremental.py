"""Incremental ingest: when the image tree changed, files whose path, size and modification time
the last catalog holds keep their cleaned row; only new and changed files are read again. The
catalog is the one a full ingest builds."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image

from canestra.pipeline.ingest import ingest


def _rows(out: Path) -> dict[str, tuple]:
    t = pq.read_table(out / "catalog").to_pylist()
    return {r["source_path"]: (r["image_id"], r["label"], r["split"], r["content"]) for r in t}


def _tree(sample_dir: Path, dst: Path, hold_back: int) -> list[Path]:
    """Copy the sample, keeping back the last ``hold_back`` files of each class; return those."""
    held = []
    for cls in sorted(p for p in sample_dir.iterdir() if p.is_dir()):
        files = sorted(cls.iterdir())
        (dst / cls.name).mkdir(parents=True)
        for f in files[:-hold_back]:
            shutil.copy2(f, dst / cls.name / f.name)
        held += files[-hold_back:]
    return held


def test_a_changed_tree_reads_only_new_and_changed_files(spark, sample_dir, tmp_path):
    tree, out = tmp_path / "tree", tmp_path / "out"
    held = _tree(sample_dir, tree, hold_back=3)
    first = ingest(spark, str(tree), str(out))
    assert first.read == first.images and first.unchanged == 0
    before = _rows(out)

    for f in held:  # new images arrive
        shutil.copy2(f, tree / f.parent.name / f.name)
    changed = sorted((tree / held[0].parent.name).iterdir())[0]  # and one file is edited in place
    Image.open(changed).convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(changed, "JPEG")
    os.utime(changed, (1_700_000_000, 1_700_000_000))

    second = ingest(spark, str(tree), str(out))
    assert not second.reused
    assert second.images == first.images + len(held)
    assert second.read == len(held) + 1  # the new files and the edited one, nothing else
    assert second.unchanged == first.images - 1
    assert "files read" in second.note() and f"{second.unchanged} unchanged" in second.note()

    full = ingest(spark, str(tree), str(tmp_path / "full"), reuse=False)
    assert full.read == full.images
    assert _rows(out) == _rows(tmp_path / "full")  # ids, labels, splits and cleaned bytes all equal
    edited = os.path.abspath(changed)
    assert _rows(out)[edited][0] != before[edited][0]  # the edit was seen: new pixels, new id

    third = ingest(spark, str(tree), str(out))  # nothing changed since: the catalog is kept whole
    assert third.reused and third.read is None


def test_other_split_parameters_read_everything_again(spark, sample_dir, tmp_path):
    tree, out = tmp_path / "tree", tmp_path / "out"
    _tree(sample_dir, tree, hold_back=1)
    ingest(spark, str(tree), str(out))
    again = ingest(spark, str(tree), str(out), seed=7)
    assert again.unchanged == 0 and again.read == again.images


def test_a_catalog_without_file_dates_is_rebuilt(spark, sample_dir, tmp_path):
    """A catalog written before the source_size/source_mtime columns (canestra <= 0.2) is not trusted."""
    tree, out = tmp_path / "tree", tmp_path / "out"
    held = _tree(sample_dir, tree, hold_back=1)
    first = ingest(spark, str(tree), str(out))
    table = pq.read_table(out / "catalog").drop(["source_size", "source_mtime"])
    for part in (out / "catalog").glob("*.parquet"):
        part.unlink()
    pq.write_table(table, out / "catalog" / "part-old.parquet")
    shutil.copy2(held[0], tree / held[0].parent.name / held[0].name)
    again = ingest(spark, str(tree), str(out))
    assert again.unchanged == 0 and again.read == again.images == first.images + 1
