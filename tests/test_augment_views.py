"""`train --augment-views N`: N seeded views of each family-labelled training photo join the
training rows; their embeddings are stored once (a re-run embeds none) under the photo's own id
(so `erase` of the photo erases its views); studio and held-out rows get none."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from canestra.config import Settings
from canestra.errors import InputError
from canestra.layout import FEATURES
from canestra.progress import Progress
from canestra.vision import views

REAL = Path(__file__).resolve().parents[1] / "sample" / "real-photos"
CFG = dict(pca_k=8, image_sizes="100", max_iter=20, shift_eval=False, augment_views=2)


def test_views_are_seeded_and_differ():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)
    a, b = views.view(rgb, 0, 7), views.view(rgb, 0, 7)
    assert np.array_equal(a, b)  # same photo, view and seed: same pixels, hence the same stored embedding
    assert not np.array_equal(views.view(rgb, 1, 7), a)
    assert a.shape[0] == a.shape[1] and 0.55 * 120 - 1 <= a.shape[0] <= 0.9 * 120  # a square crop of the short side


def test_augment_views_is_checked():
    with pytest.raises(InputError, match="augment-views"):
        Settings.load(augment_views=-1)


def _features(out: Path):
    return pq.read_table(out / FEATURES, columns=["image_id", "label", "split", "view"]).to_pandas()


@pytest.fixture(scope="module")
def trained(spark, tmp_path_factory, sample_dir):
    from canestra.pipeline.train import train

    out = tmp_path_factory.mktemp("views") / "out"
    cfg = Settings.load(**CFG)
    log = io.StringIO()
    first = train(spark, [str(sample_dir), str(REAL)], str(out), cfg, Progress(stream=log))
    log2 = io.StringIO()
    second = train(spark, [str(sample_dir), str(REAL)], str(out), cfg, Progress(stream=log2))
    return out, first, second, log.getvalue(), log2.getvalue()


def test_views_join_training_rows_only(trained):
    out, first, _, log, _ = trained
    df = _features(out)
    photos = df[(df["view"] == 0) & df["label"].str.endswith(" (family)")]
    train_photos = photos[photos["split"] == "train"]
    views_rows = df[df["view"] > 0]
    assert len(train_photos) > 0 and len(views_rows) == 2 * len(train_photos)
    assert set(views_rows["image_id"]) == set(train_photos["image_id"])  # only family-labelled training photos
    assert set(views_rows["split"]) == {"train"} and set(views_rows["view"]) == {1, 2}
    assert "2 augmented views of each family-labelled training photo" in log
    # Real photos trained: the unknown rule drops its energy threshold (fruitness and profile checks stay).
    unk = first.metrics["unknown"]
    assert unk["energy_threshold"] is None and unk["fruitness_threshold"] is not None
    assert "no energy threshold" in unk["rule"]
    # Held-out figures are of real photos only: no view is ever scored as held-out.
    assert first.metrics["n"] + first.metrics.get("family_roots_held_out", {}).get("n", 0) <= int(
        (df["view"] == 0).sum())


def test_rerun_embeds_no_view_again(trained):
    _, _, _, _, log2 = trained
    assert "(0 embedded," in log2


def test_erase_reaches_the_views(spark, trained):
    from canestra.privacy.erase import erase

    out, *_ = trained
    df = _features(out)
    victim = df[df["view"] > 0]["image_id"].iloc[0]
    erase(str(out), image_ids=[victim])
    for table in (out / "feature_store").rglob("part-*"):
        if table.is_dir() and any(table.glob("*.parquet")):
            ids = pq.read_table(table, columns=["image_id"]).column("image_id").to_pylist()
            assert victim not in ids, table
    assert victim not in set(_features(out)["image_id"])
