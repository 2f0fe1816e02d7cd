"""canestra watch: Structured Streaming from a folder (or S3 prefix) into OUT/predictions, exactly once.

The CLI runs as a child process (its own JVM) in its own process group, so a test can send
Ctrl-C the way a terminal does (to the whole group) or kill -9 the driver.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from test_s3 import moto  # noqa: F401  (the moto S3 server fixture, module-scoped)

TRIGGER = 3.0  # seconds, for the live test
# An image that lands while the watcher is idle waits at most one trigger, then its batch is
# scored (the batch's own time, from its progress line: on 2 cores shared by a whole team it
# ranges from ~2 s to ~20 s). SLACK covers Spark's listing and offset log before the batch
# starts and this test's polling.
SLACK = 5.0
# JVM start + first CNN load: ~30 s on a quiet 2-core machine, over 3 min when a team shares it.
START = 420
BAD_JPG = b"\xff\xd8\xff\xe0 this is not really a JPEG"


def _images(sample_dir: Path, n: int, offset: int = 0) -> list[Path]:
    """``n`` sample images spread over the classes (round robin), skipping the first ``offset``."""
    by_class = [sorted(d.glob("*.jpg")) for d in sorted(sample_dir.iterdir()) if d.is_dir()]
    flat = [imgs[i] for i in range(max(map(len, by_class))) for imgs in by_class if i < len(imgs)]
    return flat[offset:offset + n]


def drop(src: Path, dest_root: Path, name: str | None = None) -> Path:
    """Land a file the way uploaders should: written under a hidden name, then renamed."""
    dest = dest_root / src.parent.name / (name or src.name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.part"
    tmp.write_bytes(src.read_bytes())
    os.replace(tmp, dest)
    return dest


def drop_bytes(data: bytes, dest: Path) -> Path:
    tmp = dest.parent / f".{dest.name}.part"
    tmp.write_bytes(data)
    os.replace(tmp, dest)
    return dest


def predicted(out: Path) -> list[dict]:
    """Rows of OUT/predictions (read with pyarrow, which skips the hidden in-flight file)."""
    import pyarrow.parquet as pq

    d = out / "predictions"
    if not d.is_dir() or not any(p.suffix == ".parquet" for p in d.iterdir()):
        return []
    return pq.read_table(d).to_pylist()


def quarantined(out: Path) -> dict[str, str]:
    q = out / "quarantine.csv"
    return {r["path"]: r["reason"] for r in csv.DictReader(q.open())} if q.exists() else {}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON=sys.executable, PYTHONUNBUFFERED="1")
    return env


def start_watch(model: str, images: str, out: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "canestra.cli", "watch", "--model", model, "--images", images, "--out", str(out),
           "--include-paths", "--master", "local[2]", *extra]
    return subprocess.Popen(cmd, stdout=open(out.parent / f"{out.name}.stdout", "ab"),
                            stderr=open(out.parent / f"{out.name}.stderr", "ab"), env=env or _env(),
                            start_new_session=True)  # own group: killpg reaches the JVM and workers too


def wait_for(paths: set[str], out: Path, timeout: float, proc: subprocess.Popen | None = None,
             batch_of: dict[str, int] | None = None) -> dict[str, float]:
    """Poll until every path in ``paths`` has a prediction; the time each was first seen
    (and, into ``batch_of``, the id of the batch file that holds it)."""
    import pyarrow.parquet as pq

    seen: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and set(seen) != paths:
        now = time.time()
        for f in sorted((out / "predictions").glob("batch-*.parquet")):
            for path in pq.read_table(f, columns=["path"]).column("path").to_pylist():
                if path in paths and path not in seen:
                    seen[path] = now
                    if batch_of is not None:
                        batch_of[path] = int(f.stem.split("-")[-1])
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.1)
    return seen


def batch_seconds(stderr: str) -> dict[int, float]:
    """Each batch's scoring time, from the watcher's progress lines."""
    return {int(b): float(s) for b, s in re.findall(r"watch batch (\d+): .*\((\d+\.\d+)s\)", stderr)}


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (JVM, PySpark daemon, workers), from /proc."""
    parent = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    found, todo = [], [pid]
    while todo:
        pid = todo.pop()
        kids = [c for c, p in parent.items() if p == pid]
        found += kids
        todo += kids
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # an exited child of an exited parent may linger as a zombie until init reaps it
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pids: list[int], timeout: float = 60) -> list[int]:
    """Those of ``pids`` still running after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.3)
    return [p for p in pids if alive(p)]


def restart_once(model: str, inbox: Path, out: Path) -> list[str]:
    """``watch --once`` on the same --out (as after a crash); the paths in the table afterwards."""
    again = start_watch(model, str(inbox), out, "--once")
    try:
        assert again.wait(timeout=START) == 0, stderr_of(out)[-2000:]
    finally:
        stop_group(again)
    return [r["path"] for r in predicted(out)]


def batch_in_flight(out: Path, timeout: float = 60) -> bool:
    """Wait until a batch is being written (its Spark output under OUT/_watch/staging)."""
    staging = out / "_watch" / "staging"
    deadline = time.monotonic() + timeout
    while not (staging.is_dir() and any(staging.iterdir())) and time.monotonic() < deadline:
        time.sleep(0.05)
    return staging.is_dir() and any(staging.iterdir())


def stderr_of(out: Path) -> str:
    return (out.parent / f"{out.name}.stderr").read_text(errors="replace")


def stop_group(proc: subprocess.Popen) -> None:
    """Clean-up only: the test's own child group, if a failed assertion left it running."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


# --------------------------------------------------------------------------- live folder


@dataclass
class LiveRun:
    latencies: dict[str, float] = field(default_factory=dict)
    batch_of: dict[str, int] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    quarantine: dict[str, str] = field(default_factory=dict)
    rc: int | None = None
    stderr: str = ""
    processes: list[int] = field(default_factory=list)  # driver, JVM, PySpark daemon and workers at the stop
    left_running: list[int] = field(default_factory=list)
    waves: list[list[str]] = field(default_factory=list)


@pytest.fixture(scope="module")
def live(trained, sample_dir, tmp_path_factory) -> LiveRun:
    """One watcher on an empty folder: images land in waves, a corrupt JPEG and a text file among
    them; then Ctrl-C as a terminal sends it (SIGINT to the whole process group)."""
    base = tmp_path_factory.mktemp("watch-live")
    inbox, out = base / "inbox", base / "out"
    inbox.mkdir()
    proc = start_watch(os.path.join(trained.out_dir, "model"), str(inbox), out, "--trigger", f"{TRIGGER:g}s")
    run = LiveRun()
    try:
        warm = [str(drop(p, inbox)) for p in _images(sample_dir, 2)]  # JVM start + first CNN load
        assert len(wait_for(set(warm), out, START, proc)) == 2, stderr_of(out)
        run.dropped += warm
        for wave in range(3):
            time.sleep(TRIGGER * 0.4 * (wave + 1))  # land at different points of the trigger cycle
            landed = time.time()
            batch = [str(drop(p, inbox)) for p in _images(sample_dir, 3, offset=2 + 3 * wave)]
            if wave == 1:
                run.bad.append(str(drop_bytes(BAD_JPG, inbox / "broken.jpg")))
                run.bad.append(str(drop_bytes(b"notes", inbox / "notes.txt")))
            seen = wait_for(set(batch), out, 120, proc, run.batch_of)
            run.latencies.update({p: t - landed for p, t in seen.items()})
            run.dropped += batch
            run.waves.append(batch)
        deadline = time.monotonic() + 60
        while len(quarantined(out)) < len(run.bad) and time.monotonic() < deadline:
            time.sleep(0.2)
        run.processes = [proc.pid] + descendants(proc.pid)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        run.rc = proc.wait(timeout=120)
        run.left_running = wait_gone(run.processes)
    finally:
        stop_group(proc)
    run.rows, run.quarantine, run.stderr = predicted(out), quarantined(out), stderr_of(out)
    return run


@pytest.mark.slow
def test_images_landing_in_a_watched_folder_are_predicted_within_the_trigger(live, sample_dir):
    assert len(live.latencies) == 9, f"not all images predicted: {live.latencies}\n{live.stderr[-2000:]}"
    scoring = batch_seconds(live.stderr)
    waits = {}
    for wave in live.waves:  # a wave split over two batches also waits for the first one's scoring
        for p in wave:
            busy = sum(scoring[b] for b in {live.batch_of[q] for q in wave} if b <= live.batch_of[p])
            waits[p] = live.latencies[p] - busy
    assert max(waits.values()) <= TRIGGER + SLACK, f"waited {waits} (trigger {TRIGGER}s; scoring {scoring})"
    assert max(live.latencies.values()) <= TRIGGER + SLACK + 60
    paths = [r["path"] for r in live.rows]
    assert sorted(paths) == sorted(live.dropped)  # each landed image once, nothing else
    # energy, fruitness, pca_head, predicted_at: what `canestra monitor` reads (docs/monitoring.md)
    assert set(live.rows[0]) == {"path", "image_id", "prediction", "probability", "family",
                                 "family_probability", "top5", "label", "energy", "fruitness", "pca_head",
                                 "predicted_at"}
    right = sum(r["prediction"] == Path(r["path"]).parent.name == r["label"] for r in live.rows)
    assert right >= 0.9 * len(live.rows)  # sample images the model was trained on


@pytest.mark.slow
def test_bad_files_landing_in_a_watched_folder_are_quarantined(live):
    assert set(live.quarantine) == set(live.bad), live.quarantine
    broken, notes = live.bad  # the same plain reasons as batch predict
    assert "corrupt" in live.quarantine[broken] and "not an image" in live.quarantine[notes]
    assert all(r and "Traceback" not in r for r in live.quarantine.values())
    assert not set(live.bad) & {r["path"] for r in live.rows}


@pytest.mark.slow
def test_ctrl_c_stops_the_watcher_cleanly(live):
    assert live.rc == 0, live.stderr[-2000:]
    assert "canestra: watch stopped (SIGINT)" in live.stderr
    assert "Traceback" not in live.stderr and "Exception" not in live.stderr
    assert len(live.processes) >= 3  # the driver, its JVM and at least the PySpark daemon were running
    assert not live.left_running, "driver, JVM or Python workers still running after Ctrl-C"


# --------------------------------------------------------------------------- kill -9, restart


@pytest.mark.slow
def test_kill_9_mid_batch_then_restart_predicts_every_image_exactly_once(trained, sample_dir, tmp_path):
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    model = os.path.join(trained.out_dir, "model")
    first = [str(drop(p, inbox)) for p in _images(sample_dir, 6)]
    proc = start_watch(model, str(inbox), out, "--trigger", "1s")
    try:
        assert len(wait_for(set(first), out, START, proc)) == 6, stderr_of(out)
        second = [str(drop(p, inbox)) for p in _images(sample_dir, 20, offset=6)]
        in_flight = batch_in_flight(out)
        below = descendants(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
        with pytest.raises(ProcessLookupError):
            os.kill(proc.pid, 0)  # the driver is gone (reaped)
    finally:
        stop_group(proc)
    assert in_flight, "the kill did not land while a batch was being written"
    assert below, "no JVM child found"
    assert not wait_gone(below), "the JVM or its workers outlived the driver"  # the JVM exits when its stdin closes
    before = {r["path"] for r in predicted(out)}
    assert set(second) - before, "every image was already published before the kill: nothing to redo"
    third = [str(drop(p, inbox)) for p in _images(sample_dir, 4, offset=26)]  # landed while down
    paths = restart_once(model, inbox, out)
    assert len(paths) == len(set(paths)), "duplicate predictions"
    assert set(paths) == set(first + second + third), "missing predictions"


@pytest.mark.slow
def test_second_ctrl_c_leaves_at_once_and_the_batch_is_redone(trained, sample_dir, tmp_path):
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    model = os.path.join(trained.out_dir, "model")
    inbox.mkdir()
    proc = start_watch(model, str(inbox), out, "--trigger", "1s")
    try:
        first = [str(drop(p, inbox)) for p in _images(sample_dir, 2)]
        assert len(wait_for(set(first), out, START, proc)) == 2, stderr_of(out)
        many = [str(drop(p, inbox)) for p in _images(sample_dir, 24, offset=2)]
        assert batch_in_flight(out), "no batch in flight"
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=60) == 130
    finally:
        stop_group(proc)
    assert "the batch in progress was abandoned" in stderr_of(out)
    assert set(many) - {r["path"] for r in predicted(out)}, "the batch was published before the stop"
    paths = restart_once(model, inbox, out)
    assert sorted(paths) == sorted(first + many)


# --------------------------------------------------------------------------- --once (library)


@pytest.mark.slow
def test_once_predicts_what_is_there_like_predict_then_only_new_images(spark, trained, sample_dir, tmp_path):
    from canestra.pipeline.predict import predict
    from canestra.pipeline.watch import watch
    from canestra.progress import Progress

    inbox, out, batch_out = tmp_path / "inbox", tmp_path / "out", tmp_path / "predict"
    model = os.path.join(trained.out_dir, "model")
    for p in _images(sample_dir, 8):
        drop(p, inbox)
    drop_bytes(BAD_JPG, inbox / "broken.jpg")
    quiet = Progress(quiet=True)
    res = watch(spark, model, str(inbox), str(out), once=True, include_paths=True, progress=quiet)
    assert (res.predicted, res.quarantined, res.stopped_by) == (8, 1, None)
    predict(spark, model, str(inbox), str(batch_out), quiet, include_paths=True)
    streamed = spark.read.parquet(str(out / "predictions"))
    batch = spark.read.parquet(str(batch_out / "predictions"))
    assert streamed.columns == batch.columns  # the same table as `canestra predict`
    assert sorted(map(tuple, streamed.select("path", "image_id", "prediction", "family").collect())) == \
        sorted(map(tuple, batch.select("path", "image_id", "prediction", "family").collect()))
    assert quarantined(out) == quarantined(batch_out)

    res = watch(spark, model, str(inbox), str(out), once=True, include_paths=True, progress=quiet)
    assert (res.predicted, res.quarantined) == (0, 0)  # a cron re-run adds nothing
    new = [str(drop(p, inbox)) for p in _images(sample_dir, 2, offset=8)]
    res = watch(spark, model, str(inbox), str(out), once=True, include_paths=True, progress=quiet)
    assert res.predicted == 2
    paths = [r["path"] for r in predicted(out)]
    assert len(paths) == 10 == len(set(paths)) and set(new) <= set(paths)
    assert len(quarantined(out)) == 1
    # A new checkpoint starts over (batch ids from 0 again) but never replaces the old batches' files.
    shutil.rmtree(out / "_checkpoints" / "watch")
    assert watch(spark, model, str(inbox), str(out), once=True, include_paths=True, progress=quiet).predicted == 10
    assert len(predicted(out)) == 20


def test_trigger_durations():
    from canestra.errors import InputError
    from canestra.pipeline.watch import parse_trigger

    assert [parse_trigger(t) for t in ("10s", "2s", "500ms", "1m", "3")] == [10, 2, 0.5, 60, 3]
    for bad in ("0s", "soon", "-1s"):
        with pytest.raises(InputError):
            parse_trigger(bad)


def test_watch_of_a_missing_folder_is_one_plain_line(trained, tmp_path):
    cmd = [sys.executable, "-m", "canestra.cli", "watch", "--model", os.path.join(trained.out_dir, "model"),
           "--images", str(tmp_path / "nope"), "--out", str(tmp_path / "out")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"canestra: error: images folder {tmp_path / 'nope'} does not exist or is not a folder: "
        "`canestra watch` needs a folder to watch (it may be empty)"]


# --------------------------------------------------------------------------- S3 (moto)


@pytest.mark.slow
def test_watch_an_s3_prefix_through_moto(moto, trained, sample_dir, tmp_path):  # noqa: F811
    bucket, prefix = "canestra-watch-eu", "uploads"
    s3c = moto.client("s3", "eu-west-3")
    s3c.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": "eu-west-3"})
    env = {k: v for k, v in _env().items() if not k.startswith("AWS_")}
    env.update(AWS_ACCESS_KEY_ID=moto.key_id, AWS_SECRET_ACCESS_KEY=moto.secret, AWS_EC2_METADATA_DISABLED="true",
               AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
               CANESTRA_S3_ENDPOINT_URL=moto.endpoint, CANESTRA_ALLOW_HTTP_ENDPOINT="1")

    def put(src: Path) -> str:
        key = f"{prefix}/{src.parent.name}/{src.name}"
        s3c.put_object(Bucket=bucket, Key=key, Body=src.read_bytes())
        return f"s3://{bucket}/{key}"

    out = tmp_path / "out"
    before = [put(p) for p in _images(sample_dir, 3)]  # there at the start
    proc = start_watch(os.path.join(trained.out_dir, "model"), f"s3://{bucket}/{prefix}", out, "--trigger", "2s",
                       env=env)
    try:
        assert len(wait_for(set(before), out, START, proc)) == 3, stderr_of(out)
        landed = time.time()
        later = [put(p) for p in _images(sample_dir, 4, offset=3)]
        s3c.put_object(Bucket=bucket, Key=f"{prefix}/broken.jpg", Body=BAD_JPG)
        batch_of: dict[str, int] = {}
        seen = wait_for(set(later), out, 120, proc, batch_of)
        assert len(seen) == 4, stderr_of(out)
        scoring = batch_seconds(stderr_of(out))
        # The lister polls every trigger/4, then the trigger fires: at most 1.25 triggers of waiting.
        assert max(t - landed - scoring[batch_of[p]] for p, t in seen.items()) <= 2 * 1.25 + SLACK
        deadline = time.monotonic() + 60
        while not quarantined(out) and time.monotonic() < deadline:
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, stderr_of(out)[-2000:]
    finally:
        stop_group(proc)
    assert "canestra: watch stopped (SIGTERM)" in stderr_of(out)
    paths = [r["path"] for r in predicted(out)]
    assert sorted(paths) == sorted(before + later)
    assert list(quarantined(out)) == [f"s3://{bucket}/{prefix}/broken.jpg"]
