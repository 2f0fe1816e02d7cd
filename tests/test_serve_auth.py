"""Serving security: API keys on /v1/*, open health probes, the per-client rate limit, and the
`canestra serve` start-up checks (keys file, non-loopback bind)."""

from __future__ import annotations

import hmac
import logging
import os
import subprocess
import sys
import time

import pytest

from canestra.config import Settings
from canestra.errors import InputError
from canestra.serve import security

KEYS = ["k3y-alpha-0123456789", "k3y-beta-9876543210"]


@pytest.fixture(scope="module")
def model_dir(trained) -> str:
    return os.path.join(trained.out_dir, "model")


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "api-keys.txt"
    path.write_text(f"# service keys\n\n  {KEYS[0]}  \n# old: revoked-key\n{KEYS[1]}\n")
    return path


def client_for(model_dir, **settings):
    from fastapi.testclient import TestClient

    from canestra.serve.app import create_app

    return TestClient(create_app(model_dir, Settings.load(serve_threads=1, **settings)), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def client(model_dir, keys_file):
    with client_for(model_dir, api_keys_file=str(keys_file), rate_limit=0) as c:
        yield c


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_v1_needs_a_key_and_health_probes_do_not(client, sample_dir):
    image = next((sample_dir / "Banana").glob("*.jpg")).read_bytes()
    calls = [("post", "/v1/predict", {"content": image}),
             ("post", "/v1/predict/batch", {"files": [("file", ("a.jpg", image))]}),
             ("get", "/v1/model", {})]
    for method, path, kw in calls:
        for headers in ({}, bearer("wrong-key"), {"Authorization": f"Basic {KEYS[0]}"}, bearer(KEYS[0] + "x"),
                        bearer(KEYS[0][:-1])):
            r = getattr(client, method)(path, headers=headers, **kw)
            assert r.status_code == 401, (path, headers, r.text)
            assert r.headers["www-authenticate"].startswith("Bearer")
            assert "prediction" not in r.json() and "classes" not in r.json()
        for key in KEYS:  # every key of the file works, whitespace around it ignored
            r = getattr(client, method)(path, headers=bearer(key), **kw)
            assert r.status_code == 200, (path, r.text)
    assert client.post("/v1/predict", content=image, headers=bearer(KEYS[1])).json()["prediction"] == "Banana"
    assert client.get("/v1/model").json()["detail"].startswith("this service needs an API key")
    assert client.get("/v1/model", headers=bearer("nope")).json() == {"detail": "API key not accepted"}
    # comments are not keys
    assert client.get("/v1/model", headers=bearer("revoked-key")).status_code == 401
    assert client.get("/v1/model", headers=bearer("#")).status_code == 401
    for path in ("/healthz", "/readyz", "/", "/openapi.json"):
        assert client.get(path).status_code == 200, path
    schema = client.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert "401" in schema["paths"]["/v1/predict"]["post"]["responses"]
    assert "security" not in schema["paths"]["/healthz"]["get"]
    counts = client.get("/healthz").json()["requests"]
    assert counts["rejected_401"] >= 3 * 5


def test_keys_are_compared_with_every_key_in_constant_time(monkeypatch):
    digests = [security.hashlib.sha256(k.encode()).digest() for k in ["a", "b", "c", "d"]]
    seen: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def counting(a, b):
        seen.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(security.hmac, "compare_digest", counting)
    assert security.key_matches("a", digests)  # the first key matches: the other three are still compared
    assert len(seen) == 4 and all(n == (32, 32) for n in seen)  # fixed-length digests: no length leak
    seen.clear()
    assert not security.key_matches("a-much-longer-wrong-key" * 10, digests)
    assert len(seen) == 4 and all(n == (32, 32) for n in seen)


def test_keys_never_reach_logs_or_audit_lines(model_dir, keys_file, sample_dir, caplog):
    image = next((sample_dir / "Kiwi").glob("*.jpg")).read_bytes()
    caplog.set_level(logging.DEBUG)
    with client_for(model_dir, api_keys_file=str(keys_file), rate_limit=0) as c:
        assert c.post("/v1/predict", content=image, headers=bearer(KEYS[0])).status_code == 200
        assert c.post("/v1/predict", content=image, headers=bearer("guess-" + KEYS[1])).status_code == 401
        served = c.app.state.counts.snapshot()
    assert served["images"] == 1 and served["rejected_401"] == 1
    logged = caplog.text
    assert '"serve.start"' in logged and '"serve.stop"' in logged  # the audit lines were captured
    for key in KEYS:
        assert key not in logged


def test_rate_limit_answers_429_with_retry_after(model_dir):
    with client_for(model_dir, rate_limit=0.5, rate_burst=3) as c:
        codes = [c.get("/v1/model").status_code for _ in range(5)]
        assert codes[:3] == [200, 200, 200] and codes[3:] == [429, 429]  # the burst, then refused
        r = c.get("/v1/model")
        assert r.status_code == 429 and r.json()["detail"].startswith("too many requests")
        wait = int(r.headers["retry-after"])
        assert 1 <= wait <= 2  # 0.5 requests/s: one is allowed again within 2 s
        assert all(c.get(p).status_code == 200 for p in ("/healthz", "/readyz") * 5)  # probes are never limited
        time.sleep(wait)
        assert c.get("/v1/model").status_code == 200  # refilled
        assert c.get("/healthz").json()["requests"]["rejected_429"] == 3
    with client_for(model_dir, rate_limit=0) as c:  # 0 turns it off
        assert {c.get("/v1/model").status_code for _ in range(60)} == {200}


def test_rate_limiter_is_per_client_and_bounded():
    now = [0.0]
    lim = security.RateLimiter(rate=1.0, burst=2, clock=lambda: now[0])
    assert [lim.retry_after("a") for _ in range(3)] == [0, 0, 1]
    assert lim.retry_after("b") == 0  # another address has its own bucket
    now[0] += 1.0
    assert lim.retry_after("a") == 0
    for i in range(security._MAX_CLIENTS + 5):  # a flood of addresses does not grow memory without bound
        lim.retry_after(f"10.0.{i // 256}.{i % 256}")
        now[0] += 0.001
    assert len(lim._buckets) <= security._MAX_CLIENTS


@pytest.mark.parametrize("content, reason", [
    (None, "does not exist"), ("", "holds no key"), ("# only a comment\n\n   \n", "holds no key"),
    (b"\xff\xfe\x00key", "is not UTF-8"), ("dir", "is a folder"), ("two words\n", "contains a space"),
])
def test_bad_keys_file_exits_2_before_serving(tmp_path, content, reason):
    path = tmp_path / "keys.txt"
    if content == "dir":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(InputError, match=reason):
        security.load_api_keys(str(path))
    # through the real command, with CANESTRA_API_KEYS_FILE (the model is checked after the keys)
    r = subprocess.run([sys.executable, "-m", "canestra.cli", "serve", "--model", str(tmp_path / "no-model")],
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "CANESTRA_API_KEYS_FILE": str(path),
                            "XDG_STATE_HOME": str(tmp_path / "state")})
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("canestra: error: API keys file") and reason in lines[0]
    assert "Traceback" not in r.stderr and "Uvicorn" not in r.stdout + r.stderr


def serve_cli(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "canestra.cli", "serve", "--model", str(tmp_path / "no-model"),
                           *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")})


def test_non_loopback_host_without_keys_exits_2(tmp_path, keys_file):
    for host in ("0.0.0.0", "::", "192.0.2.7", "fruit.example"):
        r = serve_cli(tmp_path, "--host", host)
        assert r.returncode == 2
        assert r.stderr.strip() == (f"canestra: error: --host {host} can be reached from other machines and no API "
                                    "keys are set: pass --api-keys-file FILE (one key per line), or --allow-no-auth "
                                    "to serve anyone who can reach it")
    # past that check (the missing model is what stops these): --allow-no-auth, keys, or a loopback host
    for args in (["--host", "0.0.0.0", "--allow-no-auth"], ["--host", "0.0.0.0", "--api-keys-file", str(keys_file)],
                 ["--host", "127.0.0.1"], ["--host", "::1"], ["--host", "localhost"]):
        r = serve_cli(tmp_path, *args)
        assert r.returncode == 2 and "model folder" in r.stderr, (args, r.stderr)


def test_bad_limits_exit_2(tmp_path):
    for args in (["--rate-limit", "-1"], ["--rate-burst", "0"], ["--body-timeout", "0"], ["--drain-timeout", "-5"]):
        r = serve_cli(tmp_path, *args)
        assert r.returncode == 2 and r.stderr.startswith("canestra: error: --"), (args, r.stderr)
