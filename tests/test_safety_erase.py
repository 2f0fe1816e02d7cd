"""`canestra erase` never deletes what it does not own and reaches every store that holds an erased
image (issue 20, findings 3 and 6).

--delete-source deletes only files that a table of that --out lists by path (the catalog's
``source_path``, predictions written with --include-paths) and whose pixels are still the listed
image, never following a symbolic link out of the named tree; it says which it deleted and which
it kept. After an erase no file under --out holds the image's id or path (watch's checkpoint and
listing files, leftover ``.batch-*.tmp`` files, metrics.json and report.html included), and the
MLflow runs that training logged hold none either."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from artefacts import find

from canestra.cli import commands as cli
from canestra.vision.images import clean_image


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.delenv("CANESTRA_AUDIT_LOG", raising=False)


def _jpeg(path: Path, colour: tuple[int, int, int]) -> str:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24, 24), colour).save(path, "JPEG", quality=95)
    return clean_image(path.read_bytes()).image_id


def _catalog(out: Path, paths: dict[str, str]) -> None:
    """OUT/catalog as ingest leaves it (the columns erase reads): source_path -> image_id."""
    (out / "catalog").mkdir(parents=True)
    pq.write_table(pa.table({"image_id": list(paths.values()), "label": ["x"] * len(paths),
                             "source_path": list(paths)}), out / "catalog" / "part-00000.parquet")
    (out / "catalog" / "_canestra.json").write_text(json.dumps({"images": len(paths)}))


@pytest.fixture
def photos(tmp_path):
    """photos/ ingested into OUT/catalog, with an uncatalogued file and notes beside the photos, two
    byte-identical copies elsewhere (one predicted with --include-paths into OUT/pred, one never
    seen), a catalogued link to a file outside, and a class folder that is a link to a folder outside."""
    p = tmp_path / "photos"
    ids = {"a1": _jpeg(p / "Apple" / "a1.jpg", (200, 30, 30)), "a2": _jpeg(p / "Apple" / "a2.jpg", (30, 200, 30)),
           "extra": _jpeg(p / "Apple" / "extra.jpg", (30, 30, 200)),
           "secret": _jpeg(tmp_path / "outside" / "secret.jpg", (90, 90, 10)),
           "k1": _jpeg(tmp_path / "outside" / "Kiwi" / "k1.jpg", (10, 90, 90))}
    (p / "notes.txt").write_text("shopping list")
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(p / "Apple" / "a1.jpg", tmp_path / "elsewhere" / "copy.jpg")
    shutil.copy(p / "Apple" / "a1.jpg", tmp_path / "elsewhere" / "copy2.jpg")
    os.symlink(tmp_path / "outside" / "secret.jpg", p / "Apple" / "link.jpg")
    os.symlink(tmp_path / "outside" / "Kiwi", p / "Kiwi")
    out = tmp_path / "out"
    _catalog(out, {str(p / "Apple" / "a1.jpg"): ids["a1"], str(p / "Apple" / "a2.jpg"): ids["a2"],
                   str(p / "Apple" / "link.jpg"): ids["secret"], str(p / "Kiwi" / "k1.jpg"): ids["k1"]})
    (out / "pred" / "predictions").mkdir(parents=True)
    pq.write_table(pa.table({"path": [str(tmp_path / "elsewhere" / "copy.jpg")], "image_id": [ids["a1"]],
                             "prediction": ["Apple"]}), out / "pred" / "predictions" / "part-00000.parquet")
    return tmp_path, out, ids


def _erase(capsys, *args: str) -> tuple[int, dict, str]:
    code = cli.main(["erase", *args])
    cap = capsys.readouterr()
    lines = cap.out.splitlines()
    return code, json.loads(lines[0]) if lines else {}, cap.err


def _catalogued(out: Path) -> list[str]:
    return sorted(pq.read_table(out / "catalog")["source_path"].to_pylist())


def test_an_uncatalogued_source_file_is_kept_and_said_so(photos, capsys):
    base, out, _ = photos
    notes = base / "photos" / "notes.txt"
    code, summary, err = _erase(capsys, "--out", str(out), "--source", str(notes), "--delete-source")
    assert code == 0
    assert notes.read_text() == "shopping list", "a file no catalog lists is never deleted"
    assert summary["sources_deleted"] == 0
    assert f"kept {notes}: no table under {out} lists it" in err


def test_a_source_folder_deletes_exactly_its_catalogued_images(photos, capsys):
    base, out, ids = photos
    p = base / "photos"
    code, summary, err = _erase(capsys, "--out", str(out), "--source", str(p), "--delete-source")
    assert code == 0, err
    assert not (p / "Apple" / "a1.jpg").exists() and not (p / "Apple" / "a2.jpg").exists()
    assert summary["sources_deleted"] == 2
    assert f"deleted source {p / 'Apple' / 'a1.jpg'}" in err and f"deleted source {p / 'Apple' / 'a2.jpg'}" in err
    # Kept: never catalogued, or reached through a link out of photos/ (said so, with the reason).
    assert (p / "Apple" / "extra.jpg").is_file() and (p / "notes.txt").is_file()
    assert (base / "elsewhere" / "copy.jpg").is_file()
    assert (base / "outside" / "secret.jpg").is_file() and (p / "Apple" / "link.jpg").is_symlink()
    assert (base / "outside" / "Kiwi" / "k1.jpg").is_file()
    assert f"kept {p / 'Apple' / 'link.jpg'}: a symbolic link" in err
    assert f"kept {p / 'Kiwi' / 'k1.jpg'}: reached through a symbolic link" in err
    assert err.count("deleted source") == 2
    assert _catalogued(out) == [], "the folder's rows are erased whether or not a file was deleted"


def test_image_id_deletes_its_catalogued_path_never_an_identical_copy(photos, capsys):
    """--image-id names an image, not a file: the file ingested as it goes; copies elsewhere (one
    only predicted, one never seen) stay."""
    base, out, ids = photos
    copy = base / "elsewhere" / "copy.jpg"
    code, summary, err = _erase(capsys, "--out", str(out), "--image-id", ids["a1"], "--delete-source")
    assert code == 0, err
    assert not (base / "photos" / "Apple" / "a1.jpg").exists()
    assert copy.is_file() and (base / "elsewhere" / "copy2.jpg").is_file()
    assert summary["sources_deleted"] == 1 and err.count("deleted source") == 1
    assert f"kept {copy}: predicted, not ingested (name it with --source to delete it)" in err
    assert find(out, [ids["a1"], str(copy)]) == {}


def test_a_named_predicted_copy_is_deleted(photos, capsys):
    """--source names the file: a table of --out lists it (predict --include-paths), so it goes."""
    base, out, ids = photos
    copy = base / "elsewhere" / "copy.jpg"
    code, summary, err = _erase(capsys, "--out", str(out), "--source", str(copy), "--delete-source")
    assert code == 0, err
    assert not copy.exists() and (base / "photos" / "Apple" / "a1.jpg").is_file()
    assert summary["sources_deleted"] == 1 and f"deleted source {copy}" in err


def test_a_named_copy_that_was_never_ingested_is_kept(photos, capsys):
    base, out, ids = photos
    copy = base / "elsewhere" / "copy2.jpg"
    code, summary, err = _erase(capsys, "--out", str(out), "--source", str(copy), "--delete-source")
    assert code == 0, err
    assert copy.is_file() and (base / "photos" / "Apple" / "a1.jpg").is_file()
    assert summary["sources_deleted"] == 0 and f"kept {copy}: no table under {out} lists it" in err
    assert find(out, [ids["a1"]]) == {}, "its pixels are the catalogued image: the rows still go"


def test_a_replaced_file_at_a_catalogued_path_is_kept(photos, capsys):
    base, out, ids = photos
    a2 = base / "photos" / "Apple" / "a2.jpg"
    _jpeg(a2, (250, 250, 0))  # another photo saved under the catalogued name since
    code, summary, err = _erase(capsys, "--out", str(out), "--source", str(a2), "--delete-source")
    assert code == 0, err
    assert a2.is_file() and summary["sources_deleted"] == 0
    assert f"kept {a2}: its pixels are no longer the catalogued image" in err


# ---------------------------------------------------------------------------- every store (finding 6)


def test_a_crashed_batch_temp_file_in_a_table_folder_is_erased_too(tmp_path, capsys):
    """watch writes each batch as predictions/.batch-….parquet.<tag>.tmp, then renames it: a crash
    leaves the hidden temp file, which readers skip but which holds the image all the same."""
    photo = tmp_path / "photos" / "a.jpg"
    image_id = _jpeg(photo, (200, 10, 10))
    other = "f" * 64
    out = tmp_path / "out"
    (out / "predictions").mkdir(parents=True)
    rows = pa.table({"image_id": [image_id, other], "prediction": ["Apple", "Kiwi"]})
    pq.write_table(rows, out / "predictions" / "batch-1a2b3c4d-000000000.parquet")
    tmp = out / "predictions" / ".batch-1a2b3c4d-000000001.parquet.0badf00d.tmp"
    pq.write_table(rows, tmp, compression="none")
    cut = out / "predictions" / ".batch-1a2b3c4d-000000002.parquet.0badf00e.tmp"
    cut.write_bytes(tmp.read_bytes()[:200])  # killed mid-write: no footer, cannot be decoded
    assert find(out, [image_id])[image_id] >= {tmp.relative_to(out).as_posix()}, "positive control"

    code, summary, err = _erase(capsys, "--out", str(out), "--image-id", image_id)
    assert code == 0, err
    assert find(out, [image_id]) == {}, "no file under --out holds the id"
    assert not tmp.exists() and not cut.exists()
    assert sorted(summary["files_deleted"]) == sorted(p.relative_to(out).as_posix() for p in (tmp, cut))
    assert pq.read_table(out / "predictions")["image_id"].to_pylist() == [other]


FIXTURE_MODEL = Path(__file__).parent / "fixtures" / "model-0.1.0"
SAMPLE = Path(__file__).resolve().parents[1] / "sample" / "fruits-360"


def _watch_once(inbox: Path, out: Path) -> None:
    import subprocess
    import sys

    env = dict(os.environ, SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON=sys.executable)
    done = subprocess.run([sys.executable, "-m", "canestra.cli", "watch", "--model", str(FIXTURE_MODEL), "--images",
                           str(inbox), "--out", str(out), "--once", "--quiet", "--master", "local[1]"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_erase_reaches_the_watch_checkpoint_and_the_stream_goes_on(tmp_path, capsys):
    """watch without --include-paths keeps an image's path only in its Spark checkpoint
    (_checkpoints/watch/sources): erase by id finds it there by pixels, drops it, and the
    checkpoint still works for the next `watch` run."""
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    kiwis = sorted((SAMPLE / "Kiwi").glob("*.jpg"))
    for i, src in enumerate(kiwis[:3]):
        (inbox / "Kiwi").mkdir(parents=True, exist_ok=True)
        shutil.copy(src, inbox / "Kiwi" / f"k{i}.jpg")
    _watch_once(inbox, out)
    victim = inbox / "Kiwi" / "k0.jpg"
    image_id = clean_image(victim.read_bytes()).image_id
    hits = find(out, [image_id, str(victim)])
    assert any(h.startswith("_checkpoints/watch/sources/") for h in hits[str(victim)]), "positive control"
    assert hits[image_id]

    code, summary, err = _erase(capsys, "--out", str(out), "--image-id", image_id)
    assert code == 0, err
    assert find(out, [image_id, str(victim)]) == {}, "neither the id nor the path is left under --out"
    assert f"{victim} is still in a watched folder" in err  # it would be predicted again: said so
    assert len(pq.read_table(out / "predictions")) == 2

    victim.unlink()
    shutil.copy(kiwis[3], inbox / "Kiwi" / "k3.jpg")
    _watch_once(inbox, out)  # the rewritten checkpoint is read back (no checksum error), k1/k2 not redone
    assert len(pq.read_table(out / "predictions")) == 3
    assert image_id not in pq.read_table(out / "predictions")["image_id"].to_pylist()


def test_erase_reaches_the_mlflow_runs_training_logged(tmp_path, capsys, monkeypatch):
    """train logs metrics.json and report.html to MLflow: a run logged now holds no image id at
    all; a run logged the old way (the files as they are in the run folder) is rewritten by erase
    in a local file store, found through the training's audit record and MLFLOW_TRACKING_URI."""
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    from mlflow import MlflowClient
    from test_erase import make_gallery_run

    from canestra import tracking
    from canestra.config import Settings
    from canestra.privacy import audit

    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    photos = {name: tmp_path / "photos" / name / "IMG_1.jpg" for name in ("apple", "kiwi")}
    for i, p in enumerate(photos.values()):
        _jpeg(p, (200, 90 * i, 30))
    out = tmp_path / "runs"
    run = out / "r1"
    ids = make_gallery_run(run, photos, [("apple", "Apple Red 1", "Cherry 2"), ("kiwi", "Kiwi", "Pear 2")])
    shutil.copytree(FIXTURE_MODEL, run / "model")
    erased, kept = ids["apple"], ids["kiwi"]
    store = tmp_path / "mlruns"
    metrics = json.loads((run / "metrics.json").read_text())
    with tracking.tracked_run(str(store), run_name="now") as tracked:
        now = tracked.log_training(str(run), metrics, Settings.load())
    client = MlflowClient(tracking_uri=now.tracking_uri)
    assert find(store, [erased, kept, erased[:12]]) == {}, "a run logged now holds no image id"
    logged = client.download_artifacts(now.run_id, "metrics.json", str(tmp_path / "dl"))
    assert [e["label"] for e in json.loads(Path(logged).read_text())["worst_errors"]] == ["Apple Red 1", "Kiwi"]

    # A run logged before: metrics.json and report.html exactly as the run folder has them.
    legacy = client.create_run(client.get_experiment_by_name("canestra").experiment_id).info.run_id
    for name in ("metrics.json", "report.html"):
        client.log_artifact(legacy, str(run / name))
    client.set_terminated(legacy)
    for run_id in (now.run_id, legacy):
        audit.append_record(str(run / "_audit" / "audit.jsonl"),
                            {"command": "train", "status": "ok", "details": {"mlflow_run_id": run_id}})
    assert find(store, [erased]), "positive control: the old run holds the id"

    code, _, err = _erase(capsys, "--out", str(out), "--image-id", erased)  # store unknown: said so
    assert code == 0 and "not checked: set MLFLOW_TRACKING_URI" in err and legacy in err
    assert find(store, [erased]), "nothing claimed for a store it was not told about"

    monkeypatch.setenv("MLFLOW_TRACKING_URI", str(store))
    code, summary, err = _erase(capsys, "--out", str(out), "--image-id", erased)
    assert code == 0, err
    assert summary["rows_removed"] == {f"mlflow run {legacy}: metrics.json": 1}
    assert find(store, [erased, erased[:12]]) == {} and find(out, [erased, erased[:12]]) == {}
    assert set(find(store, [kept])) == {kept}, "the other image's entry stays in the old run"
