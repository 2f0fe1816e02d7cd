"""A publish killed (SIGKILL) or interrupted (Ctrl-C) between moving the old table out and the new
one in must never lose the table: the next run, its lock takeover or an erase finds a complete
table under the final name (issue 20, finding 4).

The crash is real: a child process publishes a table under the --out lock and kills itself right
after the first filesystem step of the publish (test-side wrappers around the real calls; nothing
in canestra reads a test hook)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from canestra.cli import commands as cli
from canestra.storage.lock import LOCK_NAME

FIXTURE_MODEL = Path(__file__).parent / "fixtures" / "model-0.1.0"
SAMPLE = Path(__file__).resolve().parents[1] / "sample" / "fruits-360"
ENV = dict(os.environ, SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON=sys.executable)
OLD_IDS = [f"{i:064x}" for i in range(1, 7)]
NEW_IDS = [f"{i:064x}" for i in range(1, 10)]

# Publishes OUT/catalog (NEW_IDS) over the old one under the --out lock, and crashes with the signal
# given right after the first step that moves a table: today's two renames (old table aside, then the
# new one in) or a single atomic exchange. "two-renames" makes the exchange unavailable, as on
# filesystems without it (NFS), so the fallback is crashed too.
HELPER = r"""
import json, os, signal, sys
import pyarrow as pa, pyarrow.parquet as pq
from canestra.storage import files
from canestra.storage.lock import out_lock

out, mode, sig, ids = sys.argv[1], sys.argv[2], getattr(signal, sys.argv[3]), json.loads(sys.argv[4])
final = os.path.join(out, "catalog")
staging = files.staging_dir(final)
os.makedirs(staging)
pq.write_table(pa.table({"image_id": ids, "source_path": [f"/photos/{i}.jpg" for i in ids]}),
               os.path.join(staging, "part-00000.parquet"))
with open(os.path.join(staging, "_canestra.json"), "w") as fh:
    json.dump({"images": len(ids)}, fh)

def crash():
    print("crashing", flush=True)
    os.kill(os.getpid(), sig)

real_replace = os.replace
def replace(src, dst, *a, **k):
    real_replace(src, dst, *a, **k)
    if os.path.abspath(src) == final:  # the old table just left its name
        crash()
os.replace = replace
real_exchange = getattr(files, "_exchange", None)
if mode == "two-renames":
    files._exchange = lambda a, b: False
elif real_exchange is not None:
    def exchange(a, b):
        done = real_exchange(a, b)
        if done:
            crash()
        return done
    files._exchange = exchange
with out_lock(out, "ingest"):
    files.publish_dir(staging, final)
print("published", flush=True)
"""


def _catalog(out: Path, ids: list[str]) -> None:
    (out / "catalog").mkdir(parents=True)
    pq.write_table(pa.table({"image_id": ids, "source_path": [f"/photos/{i}.jpg" for i in ids]}),
                   out / "catalog" / "part-00000.parquet")
    (out / "catalog" / "_canestra.json").write_text(json.dumps({"images": len(ids)}))


def _crash(out: Path, mode: str, sig: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-c", HELPER, str(out), mode, sig, json.dumps(NEW_IDS)], env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert "crashing" in done.stdout, done.stderr[-2000:]
    return done


def _ids(out: Path) -> list[str]:
    return sorted(pq.read_table(out / "catalog")["image_id"].to_pylist())


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.delenv("CANESTRA_AUDIT_LOG", raising=False)


@pytest.mark.parametrize("mode", ["native", "two-renames"])
def test_killed_publish_then_erase_keeps_the_table(tmp_path, capsys, mode):
    out = tmp_path / "out"
    _catalog(out, OLD_IDS)
    done = _crash(out, mode, "SIGKILL")
    assert done.returncode == -9 and (out / LOCK_NAME).exists()  # killed for real, its lock left behind

    assert cli.main(["erase", "--out", str(out), "--image-id", OLD_IDS[0]]) == 0, capsys.readouterr().err
    ids = _ids(out)
    assert ids in (sorted(OLD_IDS[1:]), sorted(NEW_IDS[1:])), "the table is whole: old or new, minus the erased id"
    assert not list(out.rglob("_staging")) and not [p for p in out.iterdir() if p.name.startswith(".catalog")]


@pytest.mark.parametrize("mode", ["native", "two-renames"])
def test_killed_publish_then_lock_takeover_by_the_next_run_keeps_the_table(tmp_path, mode):
    out = tmp_path / "out"
    _catalog(out, OLD_IDS)
    done = _crash(out, mode, "SIGKILL")
    assert done.returncode == -9 and (out / LOCK_NAME).exists()
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    shutil.copy(sorted((SAMPLE / "Kiwi").glob("*.jpg"))[0], imgs / "kiwi.jpg")

    # The next run on that --out: it takes over the dead run's lock and clears its _staging/.
    nxt = subprocess.run([sys.executable, "-m", "canestra.cli", "predict", "--model", str(FIXTURE_MODEL), "--images",
                          str(imgs), "--out", str(out), "--quiet", "--master", "local[1]"],
                         env=ENV, capture_output=True, text=True, timeout=600)
    assert nxt.returncode == 0, nxt.stderr[-3000:]
    assert "took over the lock" in nxt.stderr
    assert _ids(out) in (sorted(OLD_IDS), sorted(NEW_IDS)), "the catalog is there and complete"
    assert json.loads((out / "catalog" / "_canestra.json").read_text())["images"] == len(_ids(out))
    assert (out / "predictions.csv").is_file()


@pytest.mark.parametrize("mode", ["native", "two-renames"])
def test_ctrl_c_between_the_renames_keeps_the_table(tmp_path, mode):
    """Ctrl-C there: the run stops (KeyboardInterrupt) and its lock clears _staging/ on the way out."""
    out = tmp_path / "out"
    _catalog(out, OLD_IDS)
    done = _crash(out, mode, "SIGINT")
    assert "KeyboardInterrupt" in done.stderr or "published" in done.stdout
    assert not (out / LOCK_NAME).exists()  # a clean stop released the lock
    assert _ids(out) in (sorted(OLD_IDS), sorted(NEW_IDS))
    assert not list(out.rglob("_staging"))
