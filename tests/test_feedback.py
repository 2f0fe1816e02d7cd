"""POST /v1/feedback and the feedback store (docs/feedback.md): consent or nothing, clean pseudonymous
copies, train --feedback as labelled rows, erase and purge of feedback, the record of processing."""

from __future__ import annotations

import io
import json
import os
import re
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from artefacts import find
from corpus import PERSONAL_TEXT, gps_exif
from PIL import Image

from canestra.cli import commands as cli
from canestra.config import Settings
from canestra.errors import InputError
from canestra.feedback import store
from canestra.vision.images import has_metadata, pixel_id

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "real-photos"
KEY = "feedback-test-key-" + "0123456789abcdef" * 2
AUTH = {"Authorization": f"Bearer {KEY}"}


def apples(n: int, start: int = 0) -> list[Path]:
    return sorted((REAL / "Apple").glob("*.jpg"))[start:start + n]


def with_gps(path: Path) -> bytes:
    """The photo re-saved with camera make, owner, GPS position and a comment naming a person."""
    buf = io.BytesIO()
    Image.open(path).convert("RGB").save(buf, "JPEG", quality=90, exif=gps_exif(), comment=PERSONAL_TEXT)
    return buf.getvalue()


def store_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != store.MARKER)


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("keys") / "keys.txt"
    path.write_text(KEY + "\n")
    path.chmod(0o600)
    return str(path)


@pytest.fixture
def service(trained, tmp_path, keys_file):
    """An in-process service with feedback on, and its (empty) store."""
    from fastapi.testclient import TestClient

    from canestra.serve.app import create_app
    from canestra.serve.feedback import check_feedback
    from canestra.serve.security import KeyRing

    cfg = Settings.load(serve_threads=1, rate_limit=0, feedback_dir=str(tmp_path / "store"), api_keys_file=keys_file,
                        retention_days=90)
    check_feedback(cfg, 1)  # what run_serve does: the store is made (private) before the first request
    app = create_app(os.path.join(trained.out_dir, "model"), cfg, keys=KeyRing(keys_file))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, tmp_path / "store"


def test_without_consent_nothing_is_stored(service):
    client, root = service
    photo = with_gps(apples(1)[0])
    r = client.post("/v1/predict", files={"file": ("mine.jpg", photo)}, headers=AUTH)
    assert r.status_code == 200
    image_id = r.json()["image_id"]
    for consent in (None, "", "yes", "True", "1", "false", "true "):
        form = {"label": "Apple", **({} if consent is None else {"consent": consent})}
        for request in ({"data": form, "files": {"file": ("mine.jpg", photo)}}, {"data": {**form, "image_id": image_id}}):
            r = client.post("/v1/feedback", headers=AUTH, **request)
            assert r.status_code == 400, (consent, r.text)
            assert "consent is required" in r.json()["detail"] and "nothing was stored" in r.json()["detail"]
    assert store_files(root) == []
    # positive control: the same request with consent=true stores it
    r = client.post("/v1/feedback", data={"label": "Apple", "consent": "true"}, files={"file": ("mine.jpg", photo)},
                    headers=AUTH)
    assert r.status_code == 201, r.text
    assert store_files(root) == [f"family/Apple/{image_id}.jpg"]


def test_a_correction_is_stored_clean_and_pseudonymous(service):
    client, root = service
    photo = with_gps(apples(1, 3)[0])
    assert "GPS" in has_metadata(photo) and PERSONAL_TEXT in photo  # positive control: the upload carries them
    image_id = client.post("/v1/predict", files={"file": ("IMG_0042 Mario.jpg", photo)}, headers=AUTH).json()["image_id"]
    # by the id of the prediction just made (the worker kept a cleaned copy), in a urlencoded form
    r = client.post("/v1/feedback", data={"label": "apple", "consent": "true", "image_id": image_id}, headers=AUTH)
    assert r.status_code == 201, r.text
    assert r.json() == {"stored": True, "image_id": image_id, "label": "Apple", "level": "family"}
    [name] = store_files(root)
    stored = (root / name).read_bytes()
    assert name == f"family/Apple/{image_id}.jpg"  # named by the pixels: no uploader, file name or path
    assert has_metadata(stored) == [] and PERSONAL_TEXT not in stored and b"PhoneMaker" not in stored
    assert pixel_id(np.asarray(Image.open(io.BytesIO(stored)).convert("RGB"))) == image_id
    assert (root / name).stat().st_mode & 0o777 == 0o600 and root.stat().st_mode & 0o777 == 0o700
    assert not find(root, [b"IMG_0042", b"Mario"])
    # a variety the model knows is stored as that variety; the family-level form of a name as the family
    banana = sorted((ROOT / "sample" / "fruits-360" / "Banana").glob("*.jpg"))[0].read_bytes()
    r = client.post("/v1/feedback", data={"label": "banana", "consent": "true"}, files={"file": ("b.jpg", banana)},
                    headers=AUTH)
    assert (r.status_code, r.json()["level"], r.json()["label"]) == (201, "variety", "Banana")
    r = client.post("/v1/feedback", data={"label": "Mango (family)", "consent": "true"},
                    files={"file": ("b.jpg", banana)}, headers=AUTH)
    assert (r.status_code, r.json()["level"], r.json()["label"]) == (201, "family", "Mango")
    # the service's audit counts, not ids
    counts = client.get("/v1/model", headers=AUTH).json()["requests"]
    assert counts["feedback"] == 3 and counts["feedback_family"] == 2 and counts["feedback_variety"] == 1


def test_bad_corrections_are_refused_plainly(service):
    client, root = service
    photo = apples(1)[0].read_bytes()
    ok = {"consent": "true"}
    cases = [
        ({"label": "Dragon", **ok}, {"file": ("a.jpg", photo)}, 422, "unknown label"),
        ({**ok}, {"file": ("a.jpg", photo)}, 422, "no label"),
        ({"label": "Apple", **ok}, None, 422, "no photo"),
        ({"label": "Apple", **ok, "image_id": "f" * 64}, None, 404, "no recent prediction"),
        ({"label": "Apple", **ok, "image_id": "../etc"}, None, 422, "64 hex"),
        ({"label": "Apple", **ok}, {"file": ("a.txt", b"not an image")}, 415, "not an image"),
        ({"label": "Apple", **ok, "image_id": "f" * 64}, {"file": ("a.jpg", photo)}, 422, "not both"),
    ]
    for data, files, status, words in cases:
        r = client.post("/v1/feedback", data=data, files=files, headers=AUTH)
        assert (r.status_code, words in r.json()["detail"]) == (status, True), (data, r.text)
    # a browser's multipart form of text fields only, its boundary in mixed case (WebKit's)
    boundary = "----WebKitFormBoundaryQx7ZtU2aB9"
    parts = "".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
                    for k, v in {"label": "Apple", "consent": "true", "image_id": "e" * 64}.items())
    r = client.post("/v1/feedback", content=(parts + f"--{boundary}--\r\n").encode(), headers={
        **AUTH, "Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert (r.status_code, "no recent prediction" in r.json()["detail"]) == (404, True), r.text
    r = client.post("/v1/feedback", data={"label": "Apple", **ok}, files={"file": ("a.jpg", photo)})
    assert r.status_code == 401  # the API key first: no key, no write
    assert store_files(root) == []
    info = client.get("/v1/feedback", headers=AUTH).json()
    assert "90 days" in info["consent_text"] and "Apple" in info["families"] and "Banana" in info["varieties"]


def test_feedback_needs_api_keys(trained, tmp_path):
    from canestra.serve.app import create_app
    from canestra.serve.feedback import check_feedback

    cfg = Settings.load(serve_threads=1, feedback_dir=str(tmp_path / "store"))
    with pytest.raises(InputError, match="needs --api-keys-file"):
        check_feedback(cfg, 0)
    with pytest.raises(InputError, match="needs --api-keys-file"):
        create_app(os.path.join(trained.out_dir, "model"), cfg)
    assert not (tmp_path / "store").exists()


def test_recent_images_are_few_and_short_lived():
    from canestra.serve.feedback import RecentImages

    now = [0.0]
    recent = RecentImages(seconds=300, max_images=2, clock=lambda: now[0])
    photos = [p.read_bytes() for p in apples(3)]
    for p in photos:
        recent.remember(p, 40_000_000, 10_000_000)
    assert len(recent) == 2  # the oldest went first
    ids = [pixel_id(np.asarray(Image.open(io.BytesIO(p)).convert("RGB"))) for p in photos]
    assert recent.get(ids[0]) is None and recent.get(ids[2]) is not None
    assert has_metadata(recent.get(ids[2]).content) == []  # a cleaned copy, never the raw upload
    now[0] = 301.0
    assert recent.get(ids[2]) is None and len(recent) == 0
    recent.remember(b"not an image", 40_000_000, 10_000_000)  # nothing kept, nothing raised
    assert len(recent) == 0


def test_labels_cannot_escape_the_store(tmp_path):
    root = tmp_path / "store"
    store.ensure_store(str(root))
    for bad in ("../x", "a/b", ".hidden", "_x", "", "x" * 101, "a\nb"):
        with pytest.raises(InputError):
            store.add(str(root), b"x", "jpeg", "a" * 64, "family", bad)
    assert store_files(root) == []


# ---------------------------------------------------------------------------- training, erase, purge, record


def make_store(root: Path, photos: dict[str, list[Path]], level: str = "family", age_days: float = 0.0) -> list[str]:
    """Corrections as POST /v1/feedback stores them (cleaned, named by id); their ids."""
    from canestra.vision.images import clean_image

    store.ensure_store(str(root))
    ids = []
    for label, paths in photos.items():
        for path in paths:
            img = clean_image(path.read_bytes())
            written = store.add(str(root), img.content, img.format, img.image_id, level, label)
            if age_days:
                then = time.time() - age_days * 86400
                os.utime(written, (then, then))
            ids.append(img.image_id)
    return ids


@pytest.fixture(scope="module")
def fed_run(spark, tmp_path_factory, sample_dir):
    """A small training with --feedback: 3 studio classes plus 6 real apple photos corrected to family Apple
    and 2 banana photos corrected to the Banana variety (a family name that is also a class name)."""
    import shutil

    import canestra

    base = tmp_path_factory.mktemp("fed")
    images = base / "studio"
    for cls in ("Banana", "Kiwi", "Lemon"):
        shutil.copytree(sample_dir / cls, images / cls)
    fb = base / "store"
    apple_ids = make_store(fb, {"Apple": apples(6)})
    banana_ids = make_store(fb, {"Banana": sorted((REAL / "Banana").glob("*.jpg"))[:2]}, level="variety")
    make_store(fb, {"Mango": apples(1, 20)})  # one photo of a label: waits for a second one
    out = base / "run"
    run = canestra.train(str(images), str(out), spark=spark, feedback=str(fb), quiet=True, pca_k=16, max_iter=20,
                         augment_views=0, shift_eval=False)
    return run, fb, out, apple_ids, banana_ids


def test_train_feedback_adds_the_corrections_as_labelled_rows(fed_run):
    run, _, out, apple_ids, banana_ids = fed_run
    catalog = pq.read_table(out / "catalog").to_pandas()
    labels = dict(zip(catalog["image_id"], catalog["label"]))
    assert {labels[i] for i in apple_ids} == {"Apple (family)"}  # the store's level, never guessed
    assert {labels[i] for i in banana_ids} == {"Banana"}
    assert "Mango (family)" not in set(catalog["label"])
    assert run.metrics["feature_store"]["featurized"] == 96 + 6 + 2
    assert [r["level"] for r in run.metrics["roots"]] == ["variety", "family", "variety"]
    assert run.metrics["counts"]["classes"] == 4  # Banana, Kiwi, Lemon and "Apple (family)"


def test_erase_of_a_feedback_image_reaches_store_tables_and_feature_store(fed_run, capsys, tmp_path):
    _, fb, out, apple_ids, _ = fed_run
    gone, kept = apple_ids[0], apple_ids[1]
    before = find(out, [gone])
    assert before and {p.split("/")[0] for p in before[gone]} >= {"catalog", "features", "feature_store"}
    assert find(fb, [gone]) == {} and any(gone in n for n in store_files(fb))  # the name holds it
    trained_on = gone in (out / "model" / "canestra_training_ids.txt").read_text()
    log = tmp_path / "audit.jsonl"
    assert cli.main(["erase", "--out", str(out), "--image-id", gone, "--feedback-dir", str(fb),
                     "--audit-log", str(log)]) == 0
    said = capsys.readouterr().out
    assert "removed 1 correction(s) from the feedback store" in said and ("retrain it" in said) == trained_on
    assert find(out, [gone]) == {} and not any(gone in n for n in store_files(fb))
    assert any(kept in n for n in store_files(fb)) and find(out, [kept])  # the other corrections stay
    record = [json.loads(x) for x in log.read_text().splitlines()][-1]
    assert record["counts"]["feedback_deleted"] == 1 and gone not in json.dumps(record)


def test_purge_expires_old_feedback(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "_logs").mkdir(parents=True)
    (run / "_logs" / "spark.log").write_text("a canestra run\n")  # what makes it a canestra output
    fb = tmp_path / "store"
    old = make_store(fb, {"Apple": apples(2)}, age_days=40)
    new = make_store(fb, {"Apple": apples(1, 5)})
    args = ["purge", "--out", str(run), "--older-than", "30", "--feedback-dir", str(fb)]
    assert cli.main([*args, "--dry-run"]) == 0
    assert "would remove 2 correction(s) older than 30 days" in capsys.readouterr().out
    assert len(store_files(fb)) == 3
    assert cli.main(args) == 0
    said = capsys.readouterr().out
    assert "removed 2 correction(s) older than 30 days from the feedback store" in said and "family/Apple: 2" in said
    assert not any(i in said for i in old)  # labels and counts, never ids
    assert store_files(fb) == [f"family/Apple/{new[0]}.jpg"]
    assert cli.main(["purge", "--out", str(run), "--older-than", "30", "--feedback-dir", str(run)]) == 2
    assert "is not a canestra feedback store" in capsys.readouterr().err


def test_record_of_processing_covers_the_feedback_store(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "_logs").mkdir(parents=True)
    (run / "_logs" / "spark.log").write_text("a canestra run\n")
    fb = tmp_path / "store"
    ids = make_store(fb, {"Apple": apples(2)})
    assert cli.main(["gdpr", "record", "--out", str(run), "--feedback-dir", str(fb)]) == 0
    rec = json.loads((run / "_gdpr" / "record-of-processing.json").read_text())
    assert rec["feedback"]["images"] == 2 and rec["feedback"]["by_level"] == {"family": 2, "variety": 0}
    assert "consent" in rec["feedback"]["legal_basis"] and any("consent" in p for p in rec["purposes"])
    md = (run / "_gdpr" / "record-of-processing.md").read_text()
    assert "Feedback store" in md and not any(i in md or i in json.dumps(rec) for i in ids)
    assert cli.main(["gdpr", "record", "--out", str(run)]) == 0  # without a store: no section
    assert json.loads((run / "_gdpr" / "record-of-processing.json").read_text())["feedback"] is None


def test_feedback_code_stays_out_of_spark_and_the_front_doors():
    """serve imports feedback.store and feedback.pointer: they (and the serve modules) load no Spark."""
    from test_architecture import _imports

    pkg = ROOT / "src" / "canestra"
    forbidden = ("pyspark", "canestra.pipeline", "canestra.api", "canestra.cli", "canestra.sparkctx")
    bad = [f"{p.name} imports {m}" for p in (pkg / "feedback" / "store.py", pkg / "feedback" / "pointer.py",
                                            pkg / "serve" / "feedback.py", pkg / "serve" / "swap.py")
           for m in _imports(p) if any(m == f or m.startswith(f + ".") for f in forbidden)]
    assert bad == []
    assert re.search(r"canestra\.pipeline", (pkg / "feedback" / "training.py").read_text())  # positive control
