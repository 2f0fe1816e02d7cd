"""Access controls of `canestra serve` (issue 20, findings 9 and 11): the rate limiter never hands a
throttled client a fresh bucket, X-Forwarded-For counts only from --forwarded-allow-ips, a loopback
bind answers no foreign Host name (DNS rebinding), the keys file (BOM, permissions, short keys) is
read strictly and re-read on SIGHUP, and request headers that trickle in get 408."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from servers import ServeProcess
from test_safety_serve_bombs import lemon, model_dir  # noqa: F401  # fixtures: the saved fixture model, a lemon

from canestra.config import Settings
from canestra.errors import InputError
from canestra.serve import security

OLD_KEY, NEW_KEY = "old-key-0123456789abcdef", "new-key-fedcba9876543210"
BOM = b"\xef\xbb\xbf"


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_eviction_never_hands_a_throttled_client_a_fresh_bucket(model_dir, monkeypatch):
    from fastapi.testclient import TestClient

    from canestra.serve.app import create_app

    monkeypatch.setattr(security, "_MAX_CLIENTS", 50)  # the table fills after 50 addresses, not 10,000
    app = create_app(model_dir, Settings.load(serve_threads=1, rate_limit=0.1, rate_burst=2))

    async def get(addr: str) -> int:
        transport = httpx.ASGITransport(app=app, client=(addr, 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
            return (await http.get("/v1/model")).status_code

    async def scenario() -> tuple[list[int], list[int], list[int]]:
        throttled = [await get("198.51.100.7") for _ in range(3)]
        flood = [await get(f"203.0.113.{i}") for i in range(120)]  # 120 new addresses, one request each
        return throttled, flood, [await get("198.51.100.7") for _ in range(2)]

    with TestClient(app):
        throttled, flood, again = asyncio.run(scenario())
    assert throttled == [200, 200, 429]
    assert again == [429, 429], "the flood of new addresses reset the throttled client's bucket"
    assert 200 in flood and 429 in flood  # beyond the table's size new addresses share one bucket
    assert flood[:49] == [200] * 49


def test_keys_file_bom_short_keys_and_permissions(tmp_path):
    bom = tmp_path / "bom.txt"
    bom.write_bytes(BOM + f"{OLD_KEY}\n".encode())
    assert security.key_matches(OLD_KEY, security.load_api_keys(str(bom)))  # the BOM is not part of the key
    short = tmp_path / "short.txt"
    short.write_text(f"{OLD_KEY}\nshort-key\n")
    with pytest.raises(InputError, match=r"1 key\(s\) shorter than 16 characters"):
        security.load_api_keys(str(short))

    def serve(path: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "canestra.cli", "serve", "--model", str(tmp_path / "no-model"),
                               "--api-keys-file", str(path)], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")})

    r = serve(short)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"canestra: error: API keys file {short}: 1 key(s) shorter than 16 characters; make keys long and random, "
        "e.g. `openssl rand -hex 24`"]
    os.chmod(bom, 0o644)
    r = serve(bom)  # the keys are fine; the missing model stops it after the warning
    assert r.returncode == 2 and "model folder" in r.stderr
    assert (f"canestra: warning: API keys file {bom} can be read by other users (mode -rw-r--r--): "
            f"run `chmod 600 {bom}`") in r.stderr.splitlines()
    os.chmod(bom, 0o600)
    assert "warning" not in serve(bom).stderr


def _reloads(server: ServeProcess, event: str) -> set[int]:
    import json

    return {json.loads(ln)["pid"] for ln in server.lines if ln.startswith("{") and f'"{event}"' in ln}


def _wait(cond, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.2)
    return cond()


def _raw(port: int, first: bytes, trickle: bytes | None, limit: float = 15) -> tuple[bytes, float | None]:
    """Send ``first``, then ``trickle`` a byte every 0.5 s; (what came back, seconds until the server closed)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    t0 = time.monotonic()
    sock.sendall(first)
    sock.settimeout(0.5)
    buf, closed, sent = b"", None, 0
    try:
        while time.monotonic() - t0 < limit:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                if trickle and sent < len(trickle):
                    try:
                        sock.sendall(trickle[sent:sent + 1])
                        sent += 1
                    except OSError:
                        pass
                continue
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                closed = time.monotonic() - t0
                break
            buf += chunk
    finally:
        sock.close()
    return buf, closed


@pytest.mark.slow  # a real 2-worker server
def test_host_check_bom_key_header_timeout_and_sighup_reload(model_dir, lemon, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_bytes(BOM + f"{OLD_KEY}\n".encode())
    os.chmod(keys, 0o600)
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    server = ServeProcess(model_dir, "--api-keys-file", str(keys), "--header-timeout", "2", "--rate-limit", "0",
                          env=env, workers=2)
    try:
        with httpx.Client(base_url=server.base, trust_env=False, timeout=30) as http:
            # the BOM is not part of the first key
            assert http.get("/v1/model", headers=bearer(OLD_KEY)).status_code == 200
            # DNS rebinding: a page on evil.example re-pointed at 127.0.0.1 sends its own name as Host
            for host in ("evil.example", f"evil.example:{server.port}", "localhost.evil.example"):
                r = http.get("/v1/model", headers={**bearer(OLD_KEY), "Host": host})
                assert r.status_code == 421, (host, r.text)
                assert "classes" not in r.text and r.json()["detail"].startswith("Host header not accepted")
            assert http.get("/healthz", headers={"Host": "evil.example"}).status_code == 421
            for host in (f"127.0.0.1:{server.port}", f"localhost:{server.port}", "[::1]", "LOCALHOST"):
                assert http.get("/v1/model", headers={**bearer(OLD_KEY), "Host": host}).status_code == 200, host

            # Slow headers: a request line and headers a byte every 0.5 s, and a connection that sends nothing.
            t0 = time.monotonic()
            slow, slow_closed = _raw(server.port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n", b"X-Slow: " * 10)
            idle, idle_closed = _raw(server.port, b"", None)
            assert http.get("/healthz").status_code == 200  # others are served meanwhile
            for got, closed in ((slow, slow_closed), (idle, idle_closed)):
                assert got.startswith(b"HTTP/1.1 408 "), got[:200]
                assert b"request headers not received in time" in got
                assert closed is not None and 1.5 <= closed <= 6, closed
            assert time.monotonic() - t0 < 20

            # SIGHUP: every worker re-reads the file in place; the old key stops working, the new one works.
            keys.write_text(f"# rotated\n{NEW_KEY}\n")
            server.proc.send_signal(signal.SIGHUP)
            assert _wait(lambda: len(_reloads(server, "serve.keys_reloaded")) == 2), server.output[-2000:]
            assert _reloads(server, "serve.keys_reloaded") == server.worker_pids()  # in place: no new worker
            for _ in range(6):  # both workers
                assert http.get("/v1/model", headers=bearer(NEW_KEY)).status_code == 200
                assert http.get("/v1/model", headers=bearer(OLD_KEY)).status_code == 401
            # An unusable file (a short key) is not taken: the keys in force stay.
            keys.write_text("short\n")
            server.proc.send_signal(signal.SIGHUP)
            assert _wait(lambda: len(_reloads(server, "serve.keys_not_reloaded")) == 2), server.output[-2000:]
            for _ in range(6):
                assert http.get("/v1/model", headers=bearer(NEW_KEY)).status_code == 200
            r = http.post("/v1/predict", content=lemon, headers=bearer(NEW_KEY))
            assert r.status_code == 200 and r.json()["prediction"] == "Lemon"
            assert server.proc.poll() is None
    finally:
        out = server.stop()
    assert "Traceback" not in out and OLD_KEY not in out and NEW_KEY not in out


@pytest.mark.slow  # a real 1-worker server
def test_forwarded_for_counts_only_from_trusted_proxies_and_sighup_reloads_one_worker(model_dir, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text(f"{OLD_KEY}\n")
    os.chmod(keys, 0o600)
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    server = ServeProcess(model_dir, "--api-keys-file", str(keys), "--rate-limit", "0.2", "--rate-burst", "2",
                          "--forwarded-allow-ips", "127.0.0.2", env=env, workers=1)
    proxy = httpx.Client(base_url=server.base, trust_env=False, timeout=30,
                         transport=httpx.HTTPTransport(local_address="127.0.0.2"))
    direct = httpx.Client(base_url=server.base, trust_env=False, timeout=30)
    try:
        def via_proxy(client_ip: str) -> int:
            return proxy.get("/v1/model", headers={**bearer(OLD_KEY), "X-Forwarded-For": client_ip}).status_code

        # Behind the trusted proxy each client has its own bucket, not the proxy's.
        assert [via_proxy("198.51.100.1") for _ in range(3)] == [200, 200, 429]
        assert [via_proxy("198.51.100.2") for _ in range(2)] == [200, 200]
        # A client that is no trusted proxy cannot pick its address: X-Forwarded-For is ignored.
        spoofed = [direct.get("/v1/model", headers={**bearer(OLD_KEY), "X-Forwarded-For": f"192.0.2.{i}"}).status_code
                   for i in range(3)]
        assert spoofed == [200, 200, 429]
        # One worker: SIGHUP re-reads the keys in the serving process, which keeps running.
        keys.write_text(f"{NEW_KEY}\n")
        server.proc.send_signal(signal.SIGHUP)
        assert _wait(lambda: len(_reloads(server, "serve.keys_reloaded")) == 1), server.output[-2000:]
        assert server.proc.poll() is None
        r = proxy.get("/v1/model", headers={**bearer(NEW_KEY), "X-Forwarded-For": "198.51.100.3"})
        assert r.status_code == 200
        r = proxy.get("/v1/model", headers={**bearer(OLD_KEY), "X-Forwarded-For": "198.51.100.4"})
        assert r.status_code == 401
    finally:
        proxy.close()
        direct.close()
        out = server.stop()
    assert "Traceback" not in out
