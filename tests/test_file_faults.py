"""Per-file faults never abort a job (issue 11): each faulty entry goes to quarantine.csv with
a plain reason, every valid image is predicted, exit 0. Local and s3:// alike.

Each test first proves its fault is real (the link loops with ELOOP, the pipe is a pipe, the
subprocess really is denied the file, the object is really gone) before checking canestra.
"""

from __future__ import annotations

import csv
import errno
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from canestra.storage import files as storage

FIXTURE_MODEL = Path(__file__).parent / "fixtures" / "model-0.1.0"
ENV = dict(os.environ, SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON=sys.executable)
CLI = [sys.executable, "-m", "canestra.cli"]
# Root ignores file modes through CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH: drop both from the
# bounding set and root is denied a chmod-000 file like anyone else (the JVM and its Python
# workers inherit the reduced set).
NO_DAC = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--inh-caps=-all"]


def valid_images(sample_dir: Path, dst: Path, per_class: int = 2) -> list[Path]:
    """A few sample JPEGs under dst/<Class>/ plus one directly under dst."""
    out = []
    for cls in ("Banana", "Kiwi"):
        (dst / cls).mkdir(parents=True, exist_ok=True)
        for src in sorted((sample_dir / cls).glob("*.jpg"))[:per_class]:
            out.append(Path(shutil.copy(src, dst / cls / src.name)))
    out.append(Path(shutil.copy(sorted((sample_dir / "Lemon").glob("*.jpg"))[0], dst / "loose.jpg")))
    return out


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def errno_of(fn, *args) -> int | None:
    try:
        fn(*args)
    except OSError as exc:
        return exc.errno
    return None


def denied_runner(locked: Path) -> list[str]:
    """A command prefix under which reading ``locked`` (mode 000) really fails; skips if none exists."""
    prefix = NO_DAC if os.geteuid() == 0 else []
    if prefix and not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv(1): no way to make a read really fail with EACCES")
    probe = subprocess.run(prefix + [sys.executable, "-c", f"open({str(locked)!r}, 'rb')"],
                           capture_output=True, text=True, timeout=60)
    if prefix and "Operation not permitted" in probe.stderr and "PermissionError" not in probe.stderr:
        pytest.skip("this container may not drop capabilities (no CAP_SETPCAP): root cannot be denied a read")
    assert probe.returncode != 0 and "PermissionError" in probe.stderr, probe.stderr  # the fault is real
    return prefix


@pytest.fixture()
def faulty_tree(tmp_path, sample_dir):
    """Valid images beside every kind of faulty entry; returns (root, valid paths, {path: reason})."""
    root = tmp_path / "images"
    valid = valid_images(sample_dir, root)
    expect = {}
    loop = root / "loop.jpg"
    loop.symlink_to("loop.jpg")  # the measured bug: one self-link stopped the whole predict
    expect[loop] = "symbolic link loop"
    dangling = root / "Banana" / "dangling.jpg"
    dangling.symlink_to(root / "gone.jpg")
    expect[dangling] = "broken symbolic link"
    cycle = root / "Kiwi" / "again"
    cycle.symlink_to("..", target_is_directory=True)  # links back to the root: no endless walk
    expect[cycle] = "folder link loop"
    pipe = root / "Banana" / "camera.jpg"
    os.mkfifo(pipe)  # opening it for reading would block forever
    expect[pipe] = "not a regular file (a named pipe)"
    garbage = root / "Kiwi" / "notes.jpg"
    garbage.write_text("shopping list: kiwis\n")
    expect[garbage] = "not an image"
    locked_file = root / "Kiwi" / "private.jpg"
    shutil.copy(valid[0], locked_file)
    locked_file.chmod(0)
    expect[locked_file] = "permission denied"
    locked_dir = root / "Lemon"
    locked_dir.mkdir()
    shutil.copy(valid[0], locked_dir / "inside.jpg")
    locked_dir.chmod(0)
    expect[locked_dir] = "permission denied"
    for junk in (root / ".DS_Store", root / "Banana" / "Thumbs.db", root / "Kiwi" / "._x.jpg"):
        junk.write_bytes(b"\x00\x05\x16\x07 not an image")  # OS leftovers: skipped, never quarantined
    (root / "__MACOSX" / "Banana").mkdir(parents=True)
    (root / "__MACOSX" / "Banana" / "._0_100.jpg").write_bytes(b"\x00\x05\x16\x07")
    yield root, valid, expect
    locked_dir.chmod(0o755)  # let pytest clean up


def check_faults_are_real(expect: dict) -> None:
    by_reason = {reason: path for path, reason in expect.items()}
    loop = by_reason["symbolic link loop"]
    assert os.path.islink(loop) and errno_of(os.stat, loop) == errno.ELOOP
    dangling = by_reason["broken symbolic link"]
    assert os.path.islink(dangling) and errno_of(os.stat, dangling) == errno.ENOENT
    assert stat.S_ISFIFO(os.stat(by_reason["not a regular file (a named pipe)"]).st_mode)
    cycle = by_reason["folder link loop"]
    assert os.path.islink(cycle) and os.path.samefile(cycle, cycle.parent.parent)  # back to the root


def test_listing_reports_each_fault_and_skips_os_junk(faulty_tree):
    root, valid, expect = faulty_tree
    check_faults_are_real(expect)
    listed = storage.list_images(str(root))
    ok = {Path(f.path) for f in listed if f.error is None}
    faults = {Path(f.path): f.error for f in listed if f.error is not None}
    at_listing = {p for p, r in expect.items() if r not in ("not an image", "permission denied")}
    at_reading = {p for p, r in expect.items() if r == "not an image" or p.is_file()}
    locked_dir = root / "Lemon"
    if os.access(locked_dir, os.R_OK | os.X_OK):  # root: the mode-000 folder is listed, its files read later
        at_reading.add(locked_dir / "inside.jpg")
    else:
        at_listing.add(locked_dir)
    assert ok == set(valid) | at_reading and set(faults) == at_listing
    for path in at_listing:
        assert expect[path] in faults[path], (path, faults[path])
    assert not [f for f in listed if Path(f.path).name in (".DS_Store", "Thumbs.db", "._x.jpg", "._0_100.jpg")]
    labels = {Path(f.path).name: f.label for f in listed}
    assert labels["loose.jpg"] is None and labels["dangling.jpg"] == "Banana" and labels["again"] == "Kiwi"


def test_reading_a_pipe_never_blocks_and_a_huge_file_is_not_read(tmp_path):
    pipe = tmp_path / "pipe.jpg"
    os.mkfifo(pipe)
    result = {}
    reader = threading.Thread(target=lambda: result.update(err=errno_of(storage.read_bytes, str(pipe))), daemon=True)
    reader.start()
    reader.join(10)
    assert not reader.is_alive(), "reading a named pipe blocked"
    with pytest.raises(storage.ReadRefused, match=r"not a regular file \(a named pipe\)"):
        storage.read_bytes(str(pipe))
    big = tmp_path / "big.jpg"
    with open(big, "wb") as fh:
        fh.truncate(3_000_000)  # sparse: no 3 MB written, but 3 MB to read
    with pytest.raises(storage.ReadRefused, match=r"file too large: 3000000 bytes exceeds the 1000-byte limit"):
        storage.read_bytes(str(big), max_bytes=1000)


@pytest.mark.slow
def test_cli_predict_quarantines_every_local_fault_and_predicts_the_rest(faulty_tree, tmp_path):
    root, valid, expect = faulty_tree
    check_faults_are_real(expect)
    prefix = denied_runner(root / "Kiwi" / "private.jpg")
    out = tmp_path / "out"
    proc = subprocess.run(prefix + CLI + ["predict", "--model", str(FIXTURE_MODEL), "--images", str(root),
                                          "--out", str(out), "--include-paths", "--quiet"],
                          capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "canestra: error" not in proc.stderr, proc.stderr
    predicted = {Path(r["path"]) for r in read_csv(out / "predictions.csv")}
    assert predicted == set(valid)
    reasons = {Path(r["path"]): r["reason"] for r in read_csv(out / "quarantine.csv")}
    assert set(reasons) == set(expect)  # junk (.DS_Store, Thumbs.db, ._*, __MACOSX) not among them
    for path, reason in expect.items():
        assert reason in reasons[path] and "\n" not in reasons[path], (path, reasons[path])


def _predict_in_process(spark, images: Path, out: Path):
    from canestra.pipeline.predict import predict
    from canestra.progress import Progress

    return predict(spark, str(FIXTURE_MODEL), str(images), str(out), Progress(quiet=True), include_paths=True)


def test_files_deleted_or_rewritten_between_listing_and_reading(spark, sample_dir, tmp_path, monkeypatch):
    from canestra.vision.images import decode_rgb, pixel_id

    root = tmp_path / "images"
    valid = valid_images(sample_dir, root, per_class=3)
    deleted, truncated, replaced = valid[0], valid[1], valid[3]
    replacement = sorted((sample_dir / "Strawberry").glob("*.jpg"))[0].read_bytes()
    real_list = storage.list_images
    listed_sizes = {}

    def list_then_change(uri, *args, **kwargs):
        listed = real_list(uri, *args, **kwargs)
        listed_sizes.update({f.path: f.size for f in listed})
        deleted.unlink()  # e.g. a sync client removing it while the job runs
        data = truncated.read_bytes()
        truncated.write_bytes(data[: len(data) // 2])  # a writer caught half-way
        replaced.write_bytes(replacement)  # rewritten whole with another photo
        return listed

    monkeypatch.setattr(storage, "list_images", list_then_change)
    res = _predict_in_process(spark, root, tmp_path / "out")
    assert str(deleted) in listed_sizes and not deleted.exists()  # listed, then really gone
    assert truncated.stat().st_size < listed_sizes[str(truncated)]
    reasons = {r["path"]: r["reason"] for r in read_csv(tmp_path / "out" / "quarantine.csv")}
    assert set(reasons) == {str(deleted), str(truncated)}
    assert "vanished after listing" in reasons[str(deleted)]
    assert "truncated" in reasons[str(truncated)] and "changed after it was listed" in reasons[str(truncated)]
    rows = {r["path"]: r for r in read_csv(tmp_path / "out" / "predictions.csv")}
    assert set(rows) == {str(p) for p in valid} - set(reasons) and res.predicted == len(valid) - 2
    # The rewritten file is predicted from the bytes read, not from anything remembered at listing.
    assert rows[str(replaced)]["image_id"] == pixel_id(decode_rgb(replacement))


@pytest.mark.slow
def test_two_runs_reading_the_same_files_at_once(sample_dir, tmp_path):
    root = tmp_path / "images"
    valid = valid_images(sample_dir, root, per_class=8)
    outs = [tmp_path / "out-a", tmp_path / "out-b"]
    procs = [subprocess.Popen(CLI + ["predict", "--model", str(FIXTURE_MODEL), "--images", str(root), "--out",
                                     str(out), "--include-paths", "--master", "local[1]"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV) for out in outs]
    started = time.monotonic()
    assert procs[0].poll() is None  # the first run was still going when the second started
    both = 0.0
    while all(p.poll() is None for p in procs) and time.monotonic() - started < 600:
        time.sleep(0.5)
        both = time.monotonic() - started
    results = [p.communicate(timeout=600) for p in procs]
    assert both > 5  # the two runs were alive together for seconds, not a sequential hand-over
    for proc, (_, err) in zip(procs, results):
        assert proc.returncode == 0, err
    tables = [sorted((r["path"], r["image_id"], r["prediction"]) for r in read_csv(out / "predictions.csv"))
              for out in outs]
    assert tables[0] == tables[1] and {Path(p) for p, _, _ in tables[0]} == set(valid)
    assert all(read_csv(out / "quarantine.csv") == [] for out in outs)


# ----------------------------------------------------------------------------- s3://


@pytest.fixture()
def moto_bucket(tmp_path, monkeypatch):
    """A moto S3 server on 127.0.0.1 with an EU bucket; canestra pointed at it through env vars."""
    pytest.importorskip("moto")
    import boto3
    from cluster import free_port, wait_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    with open(tmp_path / "moto.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_port(port, timeout=60)
        endpoint = f"http://127.0.0.1:{port}"
        for name in list(os.environ):
            if name.startswith(("AWS_", "CANESTRA_S3")):
                monkeypatch.delenv(name)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
        monkeypatch.setenv("CANESTRA_S3_ENDPOINT_URL", endpoint)
        monkeypatch.setenv("CANESTRA_ALLOW_HTTP_ENDPOINT", "1")  # moto serves plain http on loopback
        storage.configure_s3(None)
        client = boto3.client("s3", endpoint_url=endpoint, region_name="eu-west-3",
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        client.create_bucket(Bucket="faults", CreateBucketConfiguration={"LocationConstraint": "eu-west-3"})
        yield client
    finally:
        storage.configure_s3(None)
        proc.terminate()
        proc.wait(timeout=10)


def test_s3_listing_skips_junk_and_a_vanished_object_is_quarantined(moto_bucket, spark, sample_dir):
    from canestra.pipeline.ingest import cleaned_frame

    jpegs = sorted((sample_dir / "Banana").glob("*.jpg"))[:3]
    objects = {"img/Banana/a.jpg": jpegs[0].read_bytes(),
               "img/Banana/photo": jpegs[1].read_bytes(),  # a JPEG with no extension
               "img/Banana/gone.jpg": jpegs[2].read_bytes(),
               "img/Banana/notes.jpg": b"not a picture",
               "img/Banana/.DS_Store": b"\x00\x00\x00\x01Bud1",
               "img/Thumbs.db": b"\xd0\xcf\x11\xe0",
               "img/__MACOSX/Banana/._a.jpg": b"\x00\x05\x16\x07"}
    for key, body in objects.items():
        moto_bucket.put_object(Bucket="faults", Key=key, Body=body)
    listed = storage.list_images("s3://faults/img")
    assert sorted(f.path.rsplit("/", 1)[-1] for f in listed) == ["a.jpg", "gone.jpg", "notes.jpg", "photo"]
    moto_bucket.delete_object(Bucket="faults", Key="img/Banana/gone.jpg")
    with pytest.raises(moto_bucket.exceptions.NoSuchKey):  # really gone before the executors read it
        moto_bucket.get_object(Bucket="faults", Key="img/Banana/gone.jpg")
    rows = {r.source_path.rsplit("/", 1)[-1]: r for r in
            cleaned_frame(spark, listed, ["predict"] * len(listed), [None] * len(listed), 40_000_000).collect()}
    assert rows["a.jpg"].error is None and rows["photo"].error is None and rows["photo"].format == "jpeg"
    assert "vanished after listing" in rows["gone.jpg"].error
    assert rows["notes.jpg"].error.startswith("not an image")


def test_quarantine_reasons_are_plain():
    reasons = {storage.unreadable_reason(OSError(errno.ELOOP, "Too many levels of symbolic links"), "/x"),
               storage.unreadable_reason(PermissionError(errno.EACCES, "Permission denied"), "/x"),
               storage.unreadable_reason(FileNotFoundError("no such S3 object s3://b/k"), "s3://b/k"),
               storage.unreadable_reason(OSError(errno.EIO, "Input/output error"), "/x")}
    assert reasons == {"unreadable: symbolic link loop (the link points back to itself)",
                       "unreadable: permission denied (the user running canestra may not read this file)",
                       "unreadable: the file vanished after listing (deleted or moved while the job ran)",
                       "unreadable file: Input/output error"}
