"""Plain errors: one line saying what is wrong and what to do, exit 2, no traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

CLI = [sys.executable, "-m", "canestra.cli"]


def run_cli(*args, env=None, timeout=300):
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run(CLI + list(args), capture_output=True, text=True, env=full_env, timeout=timeout)


def assert_plain_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert "Traceback" not in proc.stderr and "Py4J" not in proc.stderr and "at org.apache" not in proc.stderr
    lines = [ln for ln in err.splitlines() if ln.startswith("canestra: error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_missing_input_folder(tmp_path):
    p = run_cli("train", "--images", str(tmp_path / "nope"), "--out", str(tmp_path / "out"))
    assert_plain_error(p, "does not exist", "--images")


def test_empty_input_folder(tmp_path):
    (tmp_path / "imgs").mkdir()
    p = run_cli("train", "--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "out"))
    assert_plain_error(p, "no files found")


def test_no_class_folders(tmp_path, sample_dir):
    (tmp_path / "imgs").mkdir()
    for f in list((sample_dir / "Banana").iterdir())[:3]:
        shutil.copy(f, tmp_path / "imgs" / f.name)
    p = run_cli("train", "--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "out"))
    assert_plain_error(p, "no class folders")


def test_single_class(tmp_path, sample_dir):
    shutil.copytree(sample_dir / "Banana", tmp_path / "imgs" / "Banana")
    p = run_cli("train", "--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "out"))
    assert_plain_error(p, "only one class", "at least 2")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_as_user(tmp_path, sample_dir):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    p = run_cli("train", "--images", str(sample_dir), "--out", str(ro / "out"))
    assert_plain_error(p, "cannot write to output folder")


def test_unwritable_output_is_a_file(tmp_path, sample_dir):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    p = run_cli("train", "--images", str(sample_dir), "--out", str(blocker / "out"))
    assert_plain_error(p, "cannot write to output folder", "--out")


def test_java_missing(tmp_path, sample_dir):
    env = {"JAVA_HOME": str(tmp_path / "no-java"), "PATH": "/nonexistent"}
    p = run_cli("train", "--images", str(sample_dir), "--out", str(tmp_path / "out"), env=env)
    assert_plain_error(p, "Java", "JAVA_HOME")


def test_java_too_old(tmp_path, sample_dir):
    fake = tmp_path / "jdk" / "bin"
    fake.mkdir(parents=True)
    (fake / "java").write_text('#!/bin/sh\necho \'openjdk version "11.0.2" 2019-01-15\' >&2\n')
    (fake / "java").chmod(0o755)
    p = run_cli("train", "--images", str(sample_dir), "--out", str(tmp_path / "out"),
                env={"JAVA_HOME": str(tmp_path / "jdk")})
    assert_plain_error(p, "Java 11", "needs Java 17")


def test_bad_model_path(tmp_path, sample_dir):
    p = run_cli("predict", "--model", str(tmp_path / "nomodel"), "--images", str(sample_dir), "--out", str(tmp_path / "o"))
    assert_plain_error(p, "model folder", "canestra train")
    (tmp_path / "notmodel").mkdir()
    p = run_cli("predict", "--model", str(tmp_path / "notmodel"), "--images", str(sample_dir), "--out", str(tmp_path / "o"))
    assert_plain_error(p, "not a saved canestra model")


def test_bad_option_values(tmp_path, sample_dir):
    p = run_cli("train", "--images", str(sample_dir), "--out", str(tmp_path / "o"), "--image-size", "abc")
    assert_plain_error(p, "image size")
    p = run_cli("train", "--images", str(sample_dir), "--out", str(tmp_path / "o"), "--test-fraction", "1.5")
    assert_plain_error(p, "--test-fraction")


def test_debug_shows_the_trace(tmp_path):
    p = run_cli("train", "--images", str(tmp_path / "nope"), "--out", str(tmp_path / "out"), "--debug")
    assert p.returncode == 2
    assert "Traceback" in p.stderr


def test_model_cache_not_writable(tmp_path, sample_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    proc = run_cli("train", "--images", str(sample_dir), "--out", str(tmp_path / "out"),
                   env={"CANESTRA_CACHE_DIR": str(blocker / "cache")})
    assert_plain_error(proc, "model cache", "is not writable", "CANESTRA_CACHE_DIR")
    assert len(proc.stderr.strip().splitlines()) == 1
