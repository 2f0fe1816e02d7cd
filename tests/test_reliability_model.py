"""A corrupt or partial model folder, or one from an incompatible canestra: exit 2 with a line
naming what is wrong, from predict, evaluate and serve alike (one check: canestra.model)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from canestra import __version__
from canestra.errors import InputError
from canestra.model import folder as model_dir
from canestra.model.folder import MODEL_FORMAT, MODEL_INFO, check_model_dir

FIXTURE = Path(__file__).parent / "fixtures" / "model-0.1.0"  # written by 0.1.0: no canestra_model.json
ENV = dict(os.environ, SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON=sys.executable)


@pytest.fixture
def model(tmp_path) -> Path:
    dest = tmp_path / "model"
    shutil.copytree(FIXTURE, dest)
    return dest


def _stage(model: Path, prefix: str) -> Path:
    return next((model / "stages").glob(f"{prefix}_*"))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "canestra.cli", *args], capture_output=True, text=True,
                          timeout=120, env=ENV)


def _break(model: Path, how: str) -> str:
    """Damage the model as ``how`` says; return what the error must name."""
    if how == "missing-stage":
        shutil.rmtree(_stage(model, "2"))
        return "stage 2 (LogisticRegression"
    if how == "truncated-data":
        data = next((_stage(model, "1") / "data").glob("*.parquet"))
        data.write_bytes(data.read_bytes()[:100])
        return str(data)
    if how == "unreadable-metadata":
        meta = next((_stage(model, "3") / "metadata").glob("part-*"))
        meta.write_text("{not json")
        return str(meta)
    if how == "no-stages":
        shutil.rmtree(model / "stages")
        return "stages/ is missing"
    if how == "newer-format":
        (model / MODEL_INFO).write_text(json.dumps({"canestra_version": "9.1.0", "model_format": MODEL_FORMAT + 1}))
        return f"canestra 9.1.0 (model format {MODEL_FORMAT + 1}); this canestra {__version__}"
    if how == "corrupt-info":
        (model / MODEL_INFO).write_text('{"canestra_version": "0.2')
        return MODEL_INFO
    raise AssertionError(how)


FAULTS = ["missing-stage", "truncated-data", "unreadable-metadata", "no-stages", "newer-format", "corrupt-info"]


@pytest.mark.parametrize("how", FAULTS)
def test_check_names_what_is_wrong(model, how):
    check_model_dir(str(model))  # intact first: the fault below is what makes it fail
    expected = _break(model, how)
    with pytest.raises(InputError) as err:
        check_model_dir(str(model))
    assert expected in str(err.value)


@pytest.mark.parametrize("command", ["predict", "evaluate", "serve"])
@pytest.mark.parametrize("how", ["missing-stage", "truncated-data", "newer-format"])
def test_cli_exits_2_with_one_line(model, tmp_path, sample_dir, command, how):
    expected = _break(model, how)
    args = [command, "--model", str(model)]
    if command != "serve":
        args += ["--images", str(sample_dir / "Kiwi"), "--out", str(tmp_path / "out")]
    else:
        from cluster import free_port

        args += ["--port", str(free_port())]  # only reached if the model check failed to refuse it
    proc = _cli(*args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("canestra: error: "), proc.stderr
    assert expected in lines[0]
    assert not (tmp_path / "out" / "predictions").exists()


def test_model_without_info_file_still_loads(model):
    assert not (model / MODEL_INFO).exists()
    assert check_model_dir(str(model)) == str(model)
    from canestra.serve.predictor import load_model_spec

    assert len(load_model_spec(str(model)).labels) == 10


def test_info_file_round_trip_and_current_format_accepted(model):
    class ImageFeaturizer:  # stand-ins: only their class names are recorded
        pass

    class LogisticRegressionModel:
        pass

    # One classifier: format 1, which older canestra versions read; with the answer head: the current format.
    for stages, fmt in (([ImageFeaturizer(), LogisticRegressionModel()], 1),
                        ([ImageFeaturizer(), LogisticRegressionModel(), LogisticRegressionModel()], MODEL_FORMAT)):
        path = model_dir.write_model_info(str(model), stages)
        info = json.loads(Path(path).read_text())
        assert info["canestra_version"] == __version__ and info["model_format"] == fmt
        assert info["stages"][0].endswith(".ImageFeaturizer")
        assert check_model_dir(str(model)) == str(model)
        assert model_dir.model_info(str(model))["model_format"] == fmt


def test_serve_refuses_remote_model():
    from canestra.serve.predictor import check_model_dir as serve_check

    with pytest.raises(InputError, match="serve a local model folder"):
        serve_check("s3://bucket/model")
