"""canestra.api as a notebook sees it: failures inside Spark arrive as canestra's typed errors
(never a raw Py4JJavaError or JVM log lines), and each call runs with its own settings.

Each case runs in a fresh Python process (its own JVM): they restart or starve Spark, which the
suite's shared session must not see.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

FIXTURE_MODEL = Path(__file__).parent / "fixtures" / "model-0.1.0"


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    full = dict(os.environ, SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON=sys.executable, **env)
    full.pop("CANESTRA_SPARK_LOG", None)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=900, env=full)


def _outcome(proc: subprocess.CompletedProcess) -> dict:
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert lines, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(lines[-1])


def _no_jvm_noise(stderr: str) -> None:
    for noise in ("Py4JJavaError", "at org.apache", " WARN ", " ERROR ", "Traceback", "log4j"):
        assert noise not in stderr, stderr[-3000:]


CATCH = """
import json, canestra
from canestra.errors import CanestraError
def attempt(fn, *args, **kw):
    try:
        fn(*args, **kw)
        return {"raised": None}
    except CanestraError as exc:
        return {"raised": type(exc).__name__, "bases": [c.__name__ for c in type(exc).__mro__], "message": str(exc)}
"""


@pytest.mark.slow
def test_predict_into_a_full_disk_raises_disk_full(tmp_path, sample_dir, small_tmpfs):
    disk = small_tmpfs("8m")
    classes = sorted(p for p in sample_dir.iterdir() if p.is_dir())
    proc = _python(CATCH + f"""
import os
out = {str(disk / "out")!r}
canestra.predict({str(FIXTURE_MODEL)!r}, {str(classes[0])!r}, out, master="local[1]", quiet=True)
st = os.statvfs({str(disk)!r})
with open({str(disk / "filler")!r}, "wb") as fh:  # leave 48 KB: room to start, not for new tables
    fh.write(b"\\0" * max(0, st.f_bavail * st.f_frsize - 48 * 1024))
print(json.dumps(attempt(canestra.predict, {str(FIXTURE_MODEL)!r}, {str(classes[1])!r}, out,
                         master="local[1]", quiet=True)))
""")
    got = _outcome(proc)
    assert got["raised"] == "DiskFull" and "OutputError" in got["bases"], got
    assert "no space left on device" in got["message"]
    _no_jvm_noise(proc.stderr)


@pytest.mark.slow
def test_a_worker_out_of_memory_raises_out_of_memory(tmp_path, sample_dir):
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "spark-defaults.conf").write_text("spark.executor.pyspark.memory 120m\n")  # caps each Python worker
    images = sorted(p for p in sample_dir.iterdir() if p.is_dir())[0]
    proc = _python(CATCH + f"""
print(json.dumps(attempt(canestra.predict, {str(FIXTURE_MODEL)!r}, {str(images)!r}, {str(tmp_path / "out")!r},
                         master="local[1]", quiet=True)))
""", SPARK_CONF_DIR=str(conf))
    got = _outcome(proc)
    assert got["raised"] == "OutOfMemory" and "EnvironmentProblem" in got["bases"], got
    assert "memory" in got["message"]
    _no_jvm_noise(proc.stderr)
    assert "Setting mem limits to 125829120" in (tmp_path / "out" / "_logs" / "spark.log").read_text(errors="replace")


def test_an_unwritable_cnn_cache_raises_environment_problem(tmp_path, sample_dir, monkeypatch):
    import canestra
    from canestra.errors import EnvironmentProblem

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("CANESTRA_CACHE_DIR", str(blocker / "cache"))
    images = sorted(p for p in sample_dir.iterdir() if p.is_dir())[0]
    with pytest.raises(EnvironmentProblem, match="model cache .* is not writable"):
        # The graph is built before any Spark session is needed: no JVM starts for this failure.
        canestra.predict(str(FIXTURE_MODEL), str(images), str(tmp_path / "out"), quiet=True)


@pytest.mark.slow
def test_two_train_calls_each_run_with_their_own_s3_options_and_driver_memory(tmp_path, sample_dir):
    classes = sorted(p for p in sample_dir.iterdir() if p.is_dir())[:2]
    images = tmp_path / "two"
    images.mkdir()
    for c in classes:
        (images / c.name).symlink_to(c)
    proc = _python(f"""
import json, canestra
from canestra.pipeline import train as T
from canestra.storage import files as storage
seen = []
real = T.train
def spy(spark, images, out, cfg, progress, **kw):
    rt = spark.sparkContext._jvm.java.lang.Runtime.getRuntime()
    seen.append({{"endpoint": storage.s3_options().endpoint_url,
                 "driver_memory": spark.sparkContext.getConf().get("spark.driver.memory"),
                 "heap_mb": rt.maxMemory() // 2**20}})
    return real(spark, images, out, cfg, progress, **kw)
T.train = spy
small = dict(pca_k=8, max_iter=5, shift_eval=False, augment_views=0, master="local[1]", quiet=True)
canestra.train({str(images)!r}, {str(tmp_path / "a")!r}, s3_endpoint_url="https://s3.eu-west-1.example",
               driver_memory="1g", **small)
canestra.train({str(images)!r}, {str(tmp_path / "b")!r}, s3_endpoint_url="https://s3.eu-central-1.example",
               driver_memory="1536m", **small)
seen.append({{"after": storage.current_s3() is None}})
print(json.dumps(seen))
""")
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, second, after = json.loads(proc.stdout.strip().splitlines()[-1])
    assert first["endpoint"] == "https://s3.eu-west-1.example" and first["driver_memory"] == "1g"
    assert second["endpoint"] == "https://s3.eu-central-1.example" and second["driver_memory"] == "1536m"
    # The JVM itself was restarted with the second call's heap (a reused JVM keeps its first heap).
    assert first["heap_mb"] <= 1024 < second["heap_mb"] <= 1536, (first, second)
    assert after == {"after": True}, "the calls' S3 options do not outlive them"
    for run in ("a", "b"):
        assert (tmp_path / run / "model" / "canestra_model.json").is_file()
