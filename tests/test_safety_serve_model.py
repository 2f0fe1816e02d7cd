"""`GET /v1/model` gives clients model facts only (issue 20, finding 6): metrics.json lists training
images (`worst_errors`: image ids, thumbnail paths) that an erase may later remove; none of it, and no
server path, reaches a client."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

FIXTURE_MODEL = Path(__file__).parent / "fixtures" / "model-0.1.0"
IDS = ["3f2a" + "0" * 56 + "e9e9", "ab" * 32]


def test_model_route_holds_no_image_id_and_no_path(tmp_path):
    from fastapi.testclient import TestClient

    from canestra.config import Settings
    from canestra.serve.app import create_app

    run = tmp_path / "run-of-alice"
    shutil.copytree(FIXTURE_MODEL, run / "model")
    # what `canestra train` writes beside model/: aggregates, and per-image rows of the worst errors
    metrics = {
        "n": 66, "accuracy": 0.97, "macro_f1": 0.96, "weighted_f1": 0.97,
        "family": {"n": 66, "accuracy": 0.98, "per_family": {"Apple": {"n": 7, "accuracy": 1.0}}},
        "unknown": {"coverage": 0.95, "risk": 0.01}, "calibration": {"ece": 0.02, "bins": []},
        "worst_errors": [{"image_id": i, "label": "Lemon", "prediction": "Orange", "probability": 0.9,
                          "family": "Lemon", "thumbnail": f"gallery/{i}.jpg"} for i in IDS],
        "by_source": [{"root": str(tmp_path / "photos-of-alice"), "n": 3, "family_top1": 0.5}],
        "roots": [{"level": "variety", "files": 320, "folders": 10, "path": str(tmp_path / "photos-of-alice")}],
    }
    (run / "metrics.json").write_text(json.dumps(metrics))
    app = create_app(str(run / "model"), Settings.load(serve_threads=1, rate_limit=0))
    with TestClient(app) as client:
        r = client.get("/v1/model")
        schema = client.get("/openapi.json").json()
    assert r.status_code == 200
    text = r.text
    for image_id in IDS:
        assert image_id not in text
    assert "gallery" not in text and "worst_errors" not in text and "by_source" not in text
    assert str(tmp_path) not in text and "alice" not in text and "/" not in text.replace("N/A", "")
    info = r.json()
    hex64 = [s for s in re.findall(r"[0-9a-f]{64}", text) if s != info["version"]]
    assert hex64 == []  # the one 64-hex string is the model files' hash
    assert info["metrics"] == {"held_out_images": 66, "accuracy": 0.97, "macro_f1": 0.96, "weighted_f1": 0.97,
                               "family_accuracy": 0.98, "unknown_coverage": 0.95, "calibration_ece": 0.02}
    assert len(info["classes"]) == 10 and info["model_version"] == info["version"][:12]
    documented = schema["components"]["schemas"]["ModelMetrics"]["properties"]
    assert set(documented) == set(info["metrics"])
