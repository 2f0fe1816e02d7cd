"""Content-addressed features: `train` runs the CNN only on images whose (image_id, featurizer)
key is not in OUT/feature_store yet, reuses the rest, and gives the same results; a crashed
append leaves no visible part; erase and purge reach the store; the GDPR record lists it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from cnn_probe import cnn_rows  # noqa: F401  (fixture)
from PIL import Image

from canestra.config import Settings
from canestra.pipeline import features
from canestra.pipeline.train import make_featurizer, train
from canestra.progress import Progress
from canestra.vision import backbone
from canestra.vision.images import clean_image

# The trained fixture's featurizer (default sizes/precision) so its store is reused; no shift
# evaluation, whose perturbed copies would (rightly) go through the CNN.
CFG = dict(pca_k=32, max_iter=30, shift_eval=False)


class Killed(BaseException):
    """Stands for a kill: not an Exception, so no handler on the way swallows it."""


@pytest.fixture
def run(trained, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(trained.out_dir, dst)
    return dst


def vectors(table: Path) -> dict[str, list[float]]:
    t = pq.read_table(table, columns=["image_id", "features"]).to_pylist()
    return {r["image_id"]: r["features"]["values"] for r in t}


def store_of(run: Path) -> Path:
    (store,) = (run / features.STORE).iterdir()
    return store


def test_unchanged_tree_featurizes_nothing(spark, trained, run, sample_dir, cnn_rows):
    before = vectors(run / "features")
    res = train(spark, str(sample_dir), str(run), Settings.load(**CFG), Progress(quiet=True))
    assert cnn_rows == []  # the CNN stage was never even planned
    fs = res.metrics["feature_store"]
    assert fs["featurized"] == 0 and fs["reused"] == len(before)
    assert json.loads((run / "metrics.json").read_text())["feature_store"] == fs
    assert res.metrics["n_train"] == trained.metrics["n_train"] > 0
    assert vectors(run / "features") == before  # the very same embeddings
    assert res.metrics["accuracy"] == trained.metrics["accuracy"]
    assert len(features.list_parts(str(store_of(run)))) == 1  # nothing appended


def test_only_new_images_are_featurized(spark, trained, run, sample_dir, tmp_path, cnn_rows):
    images = tmp_path / "images"
    shutil.copytree(sample_dir, images)
    new_ids = set()
    for i, src in enumerate(sorted((images / "Kiwi").glob("*.jpg"))[:3]):
        dst = images / "Kiwi" / f"{900 + i}_100.jpg"  # a mirrored photo: new pixels, a new image_id
        Image.open(src).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(dst, quality=95)
        new_ids.add(clean_image(dst.read_bytes()).image_id)
    before = vectors(run / "features")
    assert len(new_ids) == 3 and not new_ids & set(before)

    res = train(spark, str(images), str(run), Settings.load(**CFG), Progress(quiet=True))
    assert cnn_rows == [3]
    fs = res.metrics["feature_store"]
    assert (fs["featurized"], fs["reused"]) == (3, len(before))
    after = vectors(run / "features")
    assert set(after) == set(before) | new_ids and res.metrics["counts"]["images"] == len(before) + 3
    assert all(after[i] == v for i, v in before.items())  # reused embeddings untouched
    parts = features.list_parts(str(store_of(run)))
    assert len(parts) == 2 and set(vectors(Path(parts[-1]))) == new_ids


def test_crashed_append_leaves_no_visible_part(spark, trained, tmp_path, monkeypatch):
    from canestra.storage import files as storage

    catalog = spark.read.parquet(os.path.join(trained.out_dir, "catalog")).limit(4)
    featurizer = make_featurizer(Settings.load())
    out = tmp_path / "out"
    out.mkdir()
    real_publish = storage.publish_dir
    crashed = []

    def crash(staging, final):
        if features.STORE in final:
            crashed.append(staging)
            raise Killed("killed while publishing")
        real_publish(staging, final)

    monkeypatch.setattr(storage, "publish_dir", crash)
    with pytest.raises(Killed):
        features.update_store(spark, catalog, str(out), featurizer)
    store = features.store_dir(str(out), featurizer)
    # The fault really struck after the part was written in full...
    assert crashed and pq.read_table(crashed[0]).num_rows == 4
    # ...and readers see no part: the store is still empty.
    assert features.list_parts(store) == [] and features.read_store(spark, store) is None
    assert [p for p in os.listdir(store) if p.startswith(features.PART_PREFIX)] == []

    monkeypatch.setattr(storage, "publish_dir", real_publish)
    df, update = features.update_store(spark, catalog, str(out), featurizer)
    assert (update.featurized, update.reused) == (4, 0) and df.count() == 4
    assert len(features.list_parts(store)) == 1


def test_featurizer_key_names_what_changes_embeddings():
    base = make_featurizer(Settings.load())
    key = features.featurizer_key(base)
    assert key == features.featurizer_key(make_featurizer(Settings.load(batch_size=8, threads=2)))
    # The other precision than the one "auto" picks on this CPU (int8 with VNNI, fp32 without).
    other_precision = "fp32" if backbone.resolve_precision("auto") == "int8" else "int8"
    for other in (Settings.load(image_sizes=(160, 224)), Settings.load(precision=other_precision)):
        assert features.featurizer_key(make_featurizer(other)) != key
    squash = make_featurizer(Settings.load())
    squash.set(squash.inputFit, "squash")
    assert features.featurizer_key(squash) != key


def test_erase_purge_and_record_reach_the_store(spark, run):
    from canestra.privacy import erase, purge, record

    store = store_of(run)
    (part,) = features.list_parts(str(store))
    stored = vectors(Path(part))
    victim = sorted(stored)[0]
    res = erase.erase(str(run), image_ids=[victim])
    assert res.rows_removed[os.path.relpath(part, run)] == 1
    left = spark.read.parquet(part)
    assert left.count() == len(stored) - 1 and left.where(f"image_id = '{victim}'").count() == 0
    assert json.loads((Path(part) / features.MANIFEST).read_text())["images"] == len(stored) - 1

    rec = record.build_record(str(run), Settings.load())
    tables = {t["table"]: t for t in rec["categories_of_data"]["tables"]}
    entry = tables[os.path.relpath(store, run)]
    assert entry["rows"] == len(stored) - 1 and entry["parts"] == 1 and "features" in entry["columns"]

    # Retention: a part expires by its manifest date, like any run output, even beside newer ones.
    manifest = Path(part) / features.MANIFEST
    info = json.loads(manifest.read_text())
    info["created_at"] = "2020-01-01T00:00:00+00:00"
    manifest.write_text(json.dumps(info))
    out = purge.purge(str(run), older_than_days=365)
    assert [e.path for e in out.removed] == [os.path.relpath(part, run)]
    assert not store.exists() and (run / "catalog").is_dir()
