"""`schemathesis run <url>/openapi.json --checks all` against a real `canestra serve` (issue 20,
finding 10): the schema says what the service does, so every check passes.

JSON Schema cannot say "a decodable image": the schema declares the parts' and bodies' image content
types, and this module, loaded by the schemathesis CLI as its hooks (SCHEMATHESIS_HOOKS), tells
schemathesis how to make files of those types, so schema-valid requests carry real images and
schema-violating ones do not."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import schemathesis
from hypothesis import strategies as st
from PIL import Image

FIXTURE_MODEL = Path(__file__).parent / "fixtures" / "model-0.1.0"
FORMATS = {"image/jpeg": "JPEG", "image/png": "PNG", "image/webp": "WEBP", "image/gif": "GIF", "image/bmp": "BMP",
           "image/tiff": "TIFF"}


def _image(fmt: str, size: tuple[int, int], colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, fmt)
    return buf.getvalue()


def _images(fmt: str) -> st.SearchStrategy[bytes]:
    channel = st.integers(0, 255)
    return st.builds(_image, st.just(fmt), st.tuples(st.integers(1, 64), st.integers(1, 64)),
                     st.tuples(channel, channel, channel))


for _media_type, _fmt in FORMATS.items():
    schemathesis.openapi.media_type(_media_type, _images(_fmt))


@pytest.mark.slow  # a real server and ~100 generated requests
def test_schemathesis_all_checks_pass_against_the_server(tmp_path):
    from servers import ServeProcess

    shutil.copytree(FIXTURE_MODEL, tmp_path / "model")
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    server = ServeProcess(str(tmp_path / "model"), "--rate-limit", "0", "--max-batch", "4", env=env)
    try:
        cli = Path(sys.executable).parent / "schemathesis"
        r = subprocess.run([str(cli), "run", f"{server.base}/openapi.json", "--checks", "all", "--seed", "20",
                            "--max-examples", "40", "--no-color"],
                           capture_output=True, text=True, timeout=600, cwd=tmp_path,
                           env={**env, "SCHEMATHESIS_HOOKS": "test_safety_serve_schema",
                                "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent),
                                                               env.get("PYTHONPATH", "")])})
    finally:
        out = server.stop()
    summary = r.stdout[-6000:]
    assert r.returncode == 0, summary
    assert "No issues found" in r.stdout or "passed" in r.stdout, summary
    assert "Traceback" not in out
