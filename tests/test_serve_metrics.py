"""`canestra serve` observability: /metrics (Prometheus text, summed over workers), request ids,
JSON log lines; never an image id, a digest or a path in any of them."""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import stat
import tempfile
import threading
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from servers import ServeProcess

from canestra.config import Settings
from canestra.errors import EnvironmentProblem, InputError
from canestra.serve import metrics as obs

HEX64 = re.compile(r"[0-9a-f]{64}", re.I)
ROUTES = {"/v1/predict", "/v1/predict/batch", "/v1/model", "/metrics", "/healthz", "/readyz", "/", "/static",
          "/docs", "/docs-assets", "/openapi.json", "other"}
KEY = "metrics-key-0123456789abcdef"


@pytest.fixture(scope="module")
def model_dir(trained) -> str:
    return os.path.join(trained.out_dir, "model")


def client_for(model_dir, **settings):
    from fastapi.testclient import TestClient

    from canestra.serve.app import create_app

    return TestClient(create_app(model_dir, Settings.load(serve_threads=1, max_batch=8, **settings)),
                      raise_server_exceptions=False)


def samples(text: str) -> dict[str, list]:
    """name -> [(labels, value)] of every sample of a text exposition (parsed by prometheus_client)."""
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def total(parsed: dict[str, list], name: str, **match: str) -> float:
    return sum(v for labels, v in parsed.get(name, []) if all(labels.get(k) == m for k, m in match.items()))


def photo(sample_dir: Path, cls: str, i: int = 0) -> bytes:
    return sorted((sample_dir / cls).glob("*.jpg"))[i].read_bytes()


def test_metrics_count_requests_answers_and_refusals(model_dir, sample_dir, caplog):
    from test_online import skimage_photo

    banana, kiwi = photo(sample_dir, "Banana"), photo(sample_dir, "Kiwi")
    cat = skimage_photo("chelsea.png").read_bytes()
    with caplog.at_level(logging.INFO, logger=obs.ACCESS_LOGGER), client_for(model_dir, rate_limit=0,
                                                                               log_format="json") as c:
        answers = [c.post("/v1/predict", content=banana).json() for _ in range(3)]
        answers.append(c.post("/v1/predict", files={"file": ("cat.png", cat)}).json())
        r = c.post("/v1/predict/batch", files=[("file", ("k.jpg", kiwi)), ("file", ("b.jpg", banana)),
                                               ("file", ("notes.txt", b"not a picture"))])
        assert [x["status"] for x in r.json()["results"]] == [200, 200, 415]
        assert "_reason" not in r.json()["results"][2]  # the metrics' label stays inside the service
        answers += r.json()["results"][:2]
        ids = [a["image_id"] for a in answers]
        assert c.post("/v1/predict", content=b"garbage").status_code == 415
        assert c.post("/v1/predict", content=b"").status_code == 422
        # a raw path that carries an id is counted under "other", never as itself
        assert c.get(f"/files/{ids[0]}/photo.jpg").status_code == 404
        assert c.get("/static/app.js").status_code == 200
        r = c.get("/metrics")
        model_version = c.get("/v1/model").json()["model_version"]
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    m = samples(r.text)
    assert total(m, "canestra_http_requests_total", route="/v1/predict", status="200") == 4
    assert total(m, "canestra_http_requests_total", route="/v1/predict", status="415") == 1
    assert total(m, "canestra_http_requests_total", route="/v1/predict", status="422") == 1
    assert total(m, "canestra_http_requests_total", route="/v1/predict/batch", method="POST", status="200") == 1
    assert total(m, "canestra_http_requests_total", route="other", status="404") == 1
    assert total(m, "canestra_http_requests_total", route="/static", status="200") == 1
    assert {labels["route"] for labels, _ in m["canestra_http_requests_total"]} <= ROUTES
    assert total(m, "canestra_http_request_duration_seconds_count", route="/v1/predict") == 6
    assert total(m, "canestra_http_request_duration_seconds_sum", route="/v1/predict") > 0
    assert total(m, "canestra_images_scored_total", route="/v1/predict") == 4
    assert total(m, "canestra_images_scored_total", route="/v1/predict/batch") == 2
    families = collections.Counter(a["family"] or "unknown" for a in answers)  # what the clients were told
    assert families["unknown"] >= 1 and families["Banana"] >= 3  # the cat; the banana photo (tests/test_serve.py)
    assert {labels["family"]: v for labels, v in m["canestra_answers_total"]} == families
    assert total(m, "canestra_rejected_inputs_total", reason="not_an_image") == 2  # one single, one in the batch
    assert total(m, "canestra_rejected_inputs_total", reason="empty") == 1
    assert m["canestra_model_info"] == [({"model_version": model_version}, 1.0)]
    assert 0 < total(m, "canestra_model_load_seconds") < 600
    assert not HEX64.search(r.text) and ids[0] not in r.text
    # the JSON access lines: one per request, the fields promised, no id or path
    lines = [json.loads(obs.JsonFormatter().format(rec)) for rec in caplog.records if rec.name == obs.ACCESS_LOGGER]
    assert len(lines) == 11
    assert all(set(x) == {"time", "level", "logger", "event", "request_id", "method", "route", "status",
                          "duration_ms"} for x in lines)
    assert [x["route"] for x in lines][-5:] == ["/v1/predict", "other", "/static", "/metrics", "/v1/model"]
    assert not any(HEX64.search(json.dumps(x)) for x in lines)


def test_request_id_is_echoed_or_made(model_dir):
    with client_for(model_dir, rate_limit=0) as c:
        assert c.get("/healthz", headers={"X-Request-ID": "req-42.a:b_c"}).headers["X-Request-ID"] == "req-42.a:b_c"
        made = {c.get("/healthz").headers["X-Request-ID"] for _ in range(3)}
        assert len(made) == 3 and all(re.fullmatch(r"[0-9a-f]{32}", x) for x in made)
        # not echoed: an image id (it would reach the logs), spaces, too long
        for bad in ("a" * 64, "has space", "x" * 65, "id\u00e9"):
            got = c.get("/healthz", headers={"X-Request-ID": bad.encode("utf-8")}).headers["X-Request-ID"]
            assert got != bad and re.fullmatch(r"[0-9a-f]{32}", got)
        # error answers carry it too
        assert c.post("/v1/predict", content=b"x", headers={"X-Request-ID": "e1"}).headers["X-Request-ID"] == "e1"
    uuid_without_dashes = "0f" * 16
    assert obs.request_id(uuid_without_dashes) == uuid_without_dashes


def test_host_check_refusals_are_counted_and_carry_a_request_id(model_dir):
    from fastapi.testclient import TestClient

    from canestra.serve.app import create_app

    app = create_app(model_dir, Settings.load(serve_threads=1, rate_limit=0), host_check=True)
    with TestClient(app, base_url="http://127.0.0.1") as c:
        r = c.get("/v1/model", headers={"Host": "evil.example"})  # a DNS-rebinding page's request
        assert r.status_code == 421 and re.fullmatch(r"[0-9a-f]{32}", r.headers["X-Request-ID"])
        m = samples(c.get("/metrics").text)
    assert total(m, "canestra_http_requests_total", route="other", status="421") == 1


def test_metrics_need_the_api_key_when_keys_are_set(model_dir, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text(KEY + "\n")
    keys.chmod(0o600)
    with client_for(model_dir, api_keys_file=str(keys), rate_limit=0) as c:
        r = c.get("/metrics")
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
        assert c.get("/metrics", headers={"Authorization": "Bearer wrong-key-0123456789"}).status_code == 401
        r = c.get("/metrics", headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 200
    m = samples(r.text)
    assert total(m, "canestra_rejected_inputs_total", reason="unauthorized") == 2
    assert total(m, "canestra_http_requests_total", route="/metrics", status="401") == 2
    assert "/metrics" not in c.app.openapi()["paths"]  # text/plain for Prometheus, not part of the JSON API


def test_metrics_are_rate_limited_like_the_api(model_dir):
    with client_for(model_dir, rate_limit=1, rate_burst=2) as c:
        statuses = [c.get("/metrics").status_code for _ in range(4)]
    assert statuses[:2] == [200, 200] and 429 in statuses[2:]


def test_log_format_setting(monkeypatch):
    from canestra.cli.commands import build_parser
    from canestra.serve.app import check_serve_settings, log_config

    assert Settings.load().log_format == "text"
    monkeypatch.setenv("CANESTRA_LOG_FORMAT", "json")
    assert Settings.load().log_format == "json"
    args = build_parser().parse_args(["serve", "--model", "m", "--log-format", "text"])
    assert Settings.load(log_format=args.log_format).log_format == "text"  # the flag beats the variable
    with pytest.raises(InputError, match="--log-format must be text or json"):
        check_serve_settings(Settings.load(log_format="yaml"))
    conf = log_config(log_format="json")
    assert conf["formatters"]["default"] == {"()": "canestra.serve.metrics.JsonFormatter"}
    assert conf["loggers"][obs.ACCESS_LOGGER]["handlers"] == ["requests"]
    assert obs.ACCESS_LOGGER not in log_config()["loggers"]  # text: no line per request, as before


def test_multiprocess_dir_is_private_and_removed(monkeypatch, tmp_path):
    monkeypatch.setenv(obs.ENV_MULTIPROC, "/somewhere/else")
    with obs.multiprocess_dir(2) as d:
        assert d is not None and os.environ[obs.ENV_MULTIPROC] == d
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
        Path(d, "counter_1.db").write_bytes(b"x")
    assert not os.path.exists(d) and os.environ[obs.ENV_MULTIPROC] == "/somewhere/else"
    with obs.multiprocess_dir(1) as d:  # one worker: the caller's folder is not written to
        assert d is None and obs.ENV_MULTIPROC not in os.environ
    assert os.environ[obs.ENV_MULTIPROC] == "/somewhere/else"
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))  # TMPDIR pointing nowhere: one plain line
    with pytest.raises(EnvironmentProblem, match="cannot make the metrics folder .*: set TMPDIR"):
        with obs.multiprocess_dir(2):
            pass


@pytest.mark.slow  # two model loads and uvicorn's start: ~15 s idle, minutes on a loaded 2-core machine
def test_two_workers_metrics_add_up_and_json_logs(model_dir, sample_dir, tmp_path):
    """20 predictions spread over 2 worker processes: /metrics, whichever worker answers it, reads
    them all; every log line is JSON; no 64-hex string in /metrics or the logs."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state"), "TMPDIR": str(tmp)}
    server = ServeProcess(model_dir, "--log-format", "json", "--rate-limit", "0", env=env, workers=2, timeout=180)
    image_ids: set[str] = set()
    try:
        folders = list(tmp.glob("canestra-metrics-*"))
        assert len(folders) == 1 and stat.S_IMODE(folders[0].stat().st_mode) == 0o700
        images = [photo(sample_dir, cls, i) for cls in ("Banana", "Kiwi") for i in range(10)]
        lock = threading.Lock()

        def send(chunk: list[bytes]) -> None:
            # a new connection per request (Connection: close), so the kernel hands them to both workers
            for data in chunk:
                r = httpx.post(server.base + "/v1/predict", content=data, headers={"Connection": "close"},
                               timeout=120, trust_env=False)
                assert r.status_code == 200, r.text
                with lock:
                    image_ids.add(r.json()["image_id"])

        threads = [threading.Thread(target=send, args=(images[i::4],)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(image_ids) == 20
        scrapes = []
        for i in range(4):  # each scrape may land on either worker: all must read the sum
            r = httpx.get(server.base + "/metrics", headers={"X-Request-ID": f"scrape-{i}", "Connection": "close"},
                          timeout=60, trust_env=False)
            assert r.status_code == 200 and r.headers["X-Request-ID"] == f"scrape-{i}"
            scrapes.append(r.text)
    finally:
        out = server.stop()
    for text in scrapes:
        m = samples(text)
        assert total(m, "canestra_http_requests_total", route="/v1/predict", status="200") == 20
        assert total(m, "canestra_images_scored_total") == 20
        assert total(m, "canestra_answers_total") == 20  # by family (Banana, Kiwi, ...) or unknown
        assert total(m, "canestra_model_load_seconds") > 0 and len(m["canestra_model_info"]) == 1
        assert not HEX64.search(text)
    # both workers took part (else the sum above would prove nothing about adding up over processes)
    stops = [a for a in server.audit_lines() if a["event"] == "serve.stop"]
    assert len(stops) == 2 and all(s["counts"].get("images", 0) > 0 for s in stops), stops
    assert list(tmp.glob("canestra-metrics-*")) == []  # the metrics folder is removed on stop
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert lines[0].startswith("canestra serve: model")  # the start line on stdout stays plain
    logs = [json.loads(ln) for ln in lines[1:]]  # every log line is one JSON object
    access = [x for x in logs if x.get("event") == "http.request"]
    assert sum(1 for x in access if x["route"] == "/v1/predict" and x["status"] == 200) == 20
    assert {f"scrape-{i}" for i in range(4)} <= {x["request_id"] for x in access}
    assert not HEX64.search(out) and not any(i in out for i in image_ids)
