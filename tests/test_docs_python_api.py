"""docs/python-api.md runs as written: its ```python blocks, in order, in one fresh Python process,
from a scratch folder holding a copy of sample/fruits-360 (what the page tells its reader to do)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "python-api.md"
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, code) of every ```python block."""
    return [(text[:m.start()].count("\n") + 1, m.group(1)) for m in BLOCK.finditer(text)]


def test_the_page_walks_through_what_it_promises():
    blocks = python_blocks(DOC.read_text())
    code = "\n".join(b for _, b in blocks)
    assert len(blocks) >= 5
    for needle in ("canestra.train(", ".to_pandas()", "OnlinePredictor", "from canestra.featurizer import "
                   "ImageFeaturizer", "Pipeline(stages=", "run.metrics"):
        assert needle in code, needle


@pytest.mark.slow
def test_every_python_block_runs_in_order(tmp_path, sample_dir):
    blocks = python_blocks(DOC.read_text())
    script = "\n".join(f"# --- docs/python-api.md line {line}\n{code}" for line, code in blocks)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    shutil.copytree(sample_dir, scratch / "fruits-360")
    (tmp_path / "walkthrough.py").write_text(script)
    env = dict(os.environ, XDG_STATE_HOME=str(tmp_path / "state"), SPARK_LOCAL_IP="127.0.0.1",
               PYSPARK_PYTHON=sys.executable)
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run([sys.executable, str(tmp_path / "walkthrough.py")], cwd=scratch, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    assert "held-out top-1 accuracy" in done.stdout and "my pipeline:" in done.stdout
    # The library calls left their files and their GDPR audit records where the page says.
    assert (scratch / "runs" / "first" / "model" / "metadata").is_dir()
    assert (scratch / "runs" / "kiwi" / "predictions.csv").is_file()
    records = [json.loads(line) for line in
               (scratch / "runs" / "first" / "_audit" / "audit.jsonl").read_text().splitlines()]
    assert [(r["command"], r["status"]) for r in records] == [("train", "ok")]
