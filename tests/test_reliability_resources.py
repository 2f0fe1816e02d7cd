"""Resource faults, caused for real: a Python worker out of memory, Spark's scratch disk full,
the JVM killed mid-job, a damaged CNN cache. Each must end in one plain line (or heal itself),
never in a JVM or Python trace."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from procs import children

FIXTURE_MODEL = Path(__file__).parent / "fixtures" / "model-0.1.0"
CLI = [sys.executable, "-m", "canestra.cli"]


def _env(**extra: str) -> dict[str, str]:
    return dict(os.environ, SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON=sys.executable, **extra)


def _predict(images: Path, out: Path, master: str = "local[1]") -> list[str]:
    return CLI + ["predict", "--model", str(FIXTURE_MODEL), "--images", str(images), "--out", str(out),
                  "--master", master]


def _one_plain_line(proc_err: str) -> str:
    assert "Traceback" not in proc_err and "EOFError" not in proc_err and "at org.apache" not in proc_err, proc_err
    assert "Exception occurred during processing" not in proc_err, proc_err
    lines = [ln for ln in proc_err.splitlines() if ln.startswith("canestra: error:")]
    assert len(lines) == 1, proc_err
    return lines[0]


def _some_class(sample_dir: Path) -> Path:
    return sorted(p for p in sample_dir.iterdir() if p.is_dir())[0]


# ----------------------------------------------------------------------------- damaged CNN cache


def test_a_damaged_cached_graph_is_rebuilt_not_used(tmp_path, monkeypatch):
    """Bytes flipped inside the cached ONNX weights load without error and embed garbage (NaN):
    the cache is checked against its digest and rebuilt."""
    from canestra.vision import backbone

    monkeypatch.setenv("CANESTRA_CACHE_DIR", str(tmp_path / "cache"))
    path = Path(backbone.default_model_path())
    rgb = [np.full((100, 100, 3), v, dtype=np.uint8) for v in (40, 200)]
    clean = backbone.embed(rgb, sizes=(100,), model_path=str(path))
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 40960] = b"\x7f" * 40960  # inside the weights: the graph still parses
    path.write_bytes(bytes(data))

    again = Path(backbone.default_model_path())
    assert again == path and backbone.model_sha256(str(path)) == (
        path.with_name(path.name + ".sha256").read_text().strip())
    healed = backbone.embed(rgb, sizes=(100,), model_path=str(again))
    np.testing.assert_allclose(healed, clean, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_predict_with_a_damaged_cache_gives_the_clean_answers(tmp_path, sample_dir):
    cache = tmp_path / "cache"
    images = _some_class(sample_dir)
    first = subprocess.run(_predict(images, tmp_path / "a"), capture_output=True, text=True, timeout=600,
                           env=_env(CANESTRA_CACHE_DIR=str(cache)))
    assert first.returncode == 0, first.stderr[-3000:]
    graph = next(cache.glob("*.onnx"))
    data = bytearray(graph.read_bytes())
    data[9_000_000:9_000_000 + 40960] = b"\x7f" * 40960
    graph.write_bytes(bytes(data))
    second = subprocess.run(_predict(images, tmp_path / "b"), capture_output=True, text=True, timeout=600,
                            env=_env(CANESTRA_CACHE_DIR=str(cache)))
    assert second.returncode == 0, second.stderr[-3000:]
    assert (tmp_path / "a" / "predictions.csv").read_text() == (tmp_path / "b" / "predictions.csv").read_text()


# ----------------------------------------------------------------------------- Python worker out of memory


@pytest.mark.slow
def test_python_worker_out_of_memory_is_one_plain_line(tmp_path, sample_dir):
    # spark.executor.pyspark.memory caps each Python worker's address space (RLIMIT_AS): at 120 MB
    # ONNX Runtime/OpenBLAS cannot allocate and the worker dies as it would on a small executor.
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "spark-defaults.conf").write_text("spark.executor.pyspark.memory 120m\n")
    out = tmp_path / "out"
    proc = subprocess.run(_predict(_some_class(sample_dir), out), capture_output=True, text=True, timeout=600,
                          env=_env(SPARK_CONF_DIR=str(conf)))
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = _one_plain_line(proc.stderr)
    assert "memory" in line and "unexpected failure" not in line, line
    log = (out / "_logs" / "spark.log").read_text(errors="replace")
    assert "Setting mem limits to 125829120" in log  # the cap really applied to the worker
    assert not (out / "predictions.csv").exists() and not (out / "_staging").exists()


# ----------------------------------------------------------------------------- scratch disk full


@pytest.fixture
def full_scratch_disk(small_tmpfs):
    mnt = small_tmpfs("4m")
    st = os.statvfs(mnt)
    with open(mnt / "filler", "wb") as fh:
        fh.write(b"\0" * (st.f_bavail * st.f_frsize - 16 * 1024))
    return mnt


@pytest.mark.slow
def test_spark_scratch_disk_full_names_the_scratch_folder(tmp_path, sample_dir, full_scratch_disk):
    out = tmp_path / "out"  # on a disk with room: only Spark's shuffle files cannot be written
    proc = subprocess.run(_predict(_some_class(sample_dir), out), capture_output=True, text=True, timeout=600,
                          env=_env(SPARK_LOCAL_DIRS=str(full_scratch_disk)))
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = _one_plain_line(proc.stderr)
    assert "no space left on device in Spark's scratch folder" in line and "SPARK_LOCAL_DIRS" in line, line
    log = (out / "_logs" / "spark.log").read_text(errors="replace")
    assert str(full_scratch_disk) in log and "No space left on device" in log
    assert not (out / "predictions.csv").exists()


# ----------------------------------------------------------------------------- the JVM killed mid-job


def _java_children(pid: int) -> list[int]:
    def is_java(child: int) -> bool:
        try:
            return b"java" in Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            return False

    return [c for c in children(pid) if is_java(c)]


@pytest.mark.slow
def test_jvm_killed_mid_predict_is_one_plain_line(tmp_path):
    images = Path(__file__).resolve().parents[2] / "shared" / "data" / "fruits-360-sample" / "Training"
    if not images.is_dir():
        pytest.skip("needs ../shared/data/fruits-360-sample (a job long enough to be killed mid-way)")
    out = tmp_path / "out"
    proc = subprocess.Popen(_predict(images, out, master="local[2]"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env())
    stderr = []
    assert proc.stderr is not None
    deadline = time.monotonic() + 300
    for line in proc.stderr:  # progress lines: wait until the predict stage runs
        stderr.append(line)
        if "predict" in line and "▸" in line:
            break
        assert time.monotonic() < deadline, "".join(stderr)
    time.sleep(6)  # mid-stage: Python workers busy, accumulator updates flowing
    javas = _java_children(proc.pid)
    assert javas, "no JVM child found"
    for pid in javas:
        os.kill(pid, signal.SIGKILL)
    _, rest = proc.communicate(timeout=300)
    err = "".join(stderr) + rest
    assert proc.returncode == 2, err[-3000:]
    line = _one_plain_line(err)
    assert "Spark's Java process stopped" in line, line
    assert not (out / "predictions.csv").exists() and not (out / "_staging").exists()


def test_py4j_broken_gateway_trace_goes_to_the_spark_log_not_the_terminal(tmp_path, capsys):
    """py4j reports a killed JVM with logging.exception on the root logger (a trace on stderr ahead of
    the command's one plain line, seen in CI): with a Spark log, those records land in the log."""
    import logging

    import py4j.java_gateway as gw

    from canestra import sparkctx

    log = tmp_path / "spark.log"
    root = logging.getLogger()
    handler = logging.StreamHandler()  # what logging.exception's basicConfig installs: stderr
    root.addHandler(handler)
    try:
        sparkctx._py4j_log_to(str(log))
        try:
            raise ConnectionResetError(104, "Connection reset by peer")
        except ConnectionResetError:
            root.handle(root.makeRecord("root", logging.ERROR, gw.__file__, 1060,
                                        "Exception while sending command.", (), sys.exc_info()))
        logging.getLogger("someone.else").error("a library's own error")
    finally:
        root.removeHandler(handler)
        root.filters = [f for f in root.filters if not isinstance(f, sparkctx._Py4JToFile)]
    err = capsys.readouterr().err
    assert "Exception while sending command" not in err and "Traceback" not in err, err
    assert "a library's own error" in err  # other records are not swallowed
    text = log.read_text()
    assert "Exception while sending command." in text and "ConnectionResetError" in text
