"""S3 throttling and 5xx: a fault-injecting HTTP proxy on 127.0.0.1 in front of a moto server
answers 503 SlowDown / 500 InternalError to chosen requests. Transient errors are retried by
botocore (standard mode, CANESTRA_S3_MAX_ATTEMPTS) and the job succeeds; persistent ones end
in one plain error line and exit 2."""

from __future__ import annotations

import http.client
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

BUCKET = "canestra-throttle"
PREFIX = "fruits"
ERRORS = [(503, "SlowDown", "Please reduce your request rate."),
          (500, "InternalError", "We encountered an internal error. Please try again.")]


class FaultProxy:
    """Forwards S3 requests to moto, answering an S3 error instead to the requests ``fail(n)`` picks."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.fail = lambda n: False
        self.seen = 0
        self.injected: list[tuple[int, str, str]] = []  # (status, code, "METHOD path")
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def _handle(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with proxy._lock:
                    n = proxy.seen
                    proxy.seen += 1
                    inject = proxy.fail(n)
                    if inject:
                        status, code, message = ERRORS[len(proxy.injected) % len(ERRORS)]
                        proxy.injected.append((status, code, f"{self.command} {self.path}"))
                if inject:
                    payload = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                               f"<Message>{message}</Message><RequestId>fault-{n}</RequestId></Error>").encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "keep-alive")}
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("connection", "keep-alive", "transfer-encoding", "content-length", "server",
                                         "date"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        class Server(http.server.ThreadingHTTPServer):
            def handle_error(self, request, client_address):  # clients closing keep-alive sockets
                pass

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def reset(self, fail) -> None:
        with self._lock:
            self.fail, self.seen, self.injected = fail, 0, []

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory, sample_dir):
    import boto3
    from cluster import free_port, wait_port

    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    with open(log, "w") as fh:
        moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=fh, stderr=subprocess.STDOUT, env=env)
    fp = None
    try:
        wait_port(port, timeout=60)
        c = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="eu-west-3",
                         aws_access_key_id="test", aws_secret_access_key="test")
        c.create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": "eu-west-3"})
        for cls in ("Kiwi", "Banana"):
            for p in sorted((sample_dir / cls).iterdir())[:8]:
                c.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{cls}/{p.name}", Body=p.read_bytes())
        fp = FaultProxy(port)
        yield fp
    finally:
        if fp:
            fp.close()
        moto.terminate()
        moto.wait(timeout=10)


def _env(proxy: FaultProxy, tmp_path: Path, attempts: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "CANESTRA_S3"))}
    env.update(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_EC2_METADATA_DISABLED="true",
               AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
               CANESTRA_S3_ENDPOINT_URL=proxy.endpoint, CANESTRA_ALLOW_HTTP_ENDPOINT="1",
               CANESTRA_S3_MAX_ATTEMPTS=str(attempts), SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON=sys.executable)
    return env


def _ingest(proxy, tmp_path, attempts: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "canestra.cli", "ingest", "--images", f"s3://{BUCKET}/{PREFIX}",
                           "--out", str(tmp_path / "out"), "--master", "local[1]"],
                          capture_output=True, text=True, timeout=600, env=_env(proxy, tmp_path, attempts))


@pytest.mark.slow
def test_throttling_and_5xx_are_retried_to_success(proxy, tmp_path):
    # The first 3 requests, then every 7th: each failed request succeeds on a retry (4 attempts allowed).
    proxy.reset(lambda n: n < 3 or n % 7 == 0)
    proc = _ingest(proxy, tmp_path, attempts=4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    codes = {code for _, code, _ in proxy.injected}
    assert codes == {"SlowDown", "InternalError"} and len(proxy.injected) >= 4, proxy.injected
    # Executors read image bytes through the proxy too, and some of those reads were refused first.
    assert any(req.startswith("GET /") and ("/Kiwi/" in req or "/Banana/" in req) for *_, req in proxy.injected)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["images"] == 16 and result["quarantined"] == 0


def test_persistent_errors_end_in_one_plain_line(proxy, tmp_path):
    proxy.reset(lambda n: True)
    proc = _ingest(proxy, tmp_path, attempts=2)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("canestra: error: "), proc.stderr
    assert "kept failing" in lines[0] and "2 attempts" in lines[0] and "CANESTRA_S3_MAX_ATTEMPTS" in lines[0]
    # Each request S3 refused was tried exactly twice (CANESTRA_S3_MAX_ATTEMPTS=2), then given up.
    tried = [req for *_, req in proxy.injected]
    assert tried and all(tried.count(req) == 2 for req in tried), tried
    print(lines[0])
