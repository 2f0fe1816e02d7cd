"""SIGTERM to a real `canestra serve` (1 and 2 workers) while batch requests are in flight: every one
of them is answered 200, the process exits 0 and is gone, and the port refuses new connections."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
import uuid

import pytest
from servers import ServeProcess

BATCH = 16
KEY = "drain-test-key-5c1f"


def multipart(files: list[bytes]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [b"--%s\r\nContent-Disposition: form-data; name=\"file\"; filename=\"%d.jpg\"\r\n"
             b"Content-Type: image/jpeg\r\n\r\n%s\r\n" % (boundary.encode(), i, data) for i, data in enumerate(files)]
    return b"".join(parts) + b"--%s--\r\n" % boundary.encode(), f"multipart/form-data; boundary={boundary}"


def read_response(sock: socket.socket) -> tuple[int, dict]:
    """Status and JSON body of one HTTP/1.1 response (the test asks the server to close afterwards)."""
    buf = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


@pytest.mark.slow  # two server starts, and each holds 16-image batches: ~30-60 s per case on 2 busy cores
@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_drains_in_flight_requests(trained, sample_dir, tmp_path, workers):
    keys = tmp_path / "keys.txt"
    keys.write_text(KEY + "\n")
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    server = ServeProcess(os.path.join(trained.out_dir, "model"), "--api-keys-file", str(keys), "--max-batch",
                          str(BATCH), "--drain-timeout", "120", env=env, workers=workers)
    try:
        photos = sorted(sample_dir.glob("*/*.jpg"))[::10][:BATCH]
        body, ctype = multipart([p.read_bytes() for p in photos])
        request = (f"POST /v1/predict/batch HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
                   f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
        n = 4 * workers  # each worker scores one batch at a time: the others wait, in flight
        results: list[tuple[int, dict] | None] = [None] * n
        first_done = threading.Event()

        def call(i: int, sock: socket.socket) -> None:
            try:
                results[i] = read_response(sock)
            finally:
                sock.close()
                first_done.set()

        socks = [socket.create_connection(("127.0.0.1", server.port), timeout=300) for _ in range(n)]
        for s in socks:
            s.sendall(request)
        threads = [threading.Thread(target=call, args=(i, s)) for i, s in enumerate(socks)]
        for t in threads:
            t.start()
        assert first_done.wait(300), "no batch was answered"
        os.kill(server.proc.pid, signal.SIGTERM)
        in_flight_at_term = sum(r is None for r in results)
        t_term = time.time()
        rc = server.wait(timeout=300)
        for t in threads:
            t.join(timeout=60)
    finally:
        out = server.stop()
    # Each worker may finish its first batch at about the same moment: at most `workers` are answered at SIGTERM.
    assert in_flight_at_term >= n - workers >= 1, "SIGTERM came after the requests were answered: nothing was drained"
    assert rc == 0, out[-3000:]
    for status, answer in results:  # every in-flight request was answered in full
        assert status == 200, answer
        assert [r["status"] for r in answer["results"]] == [200] * BATCH
    answers = {tuple(r["prediction"] for r in answer["results"]) for _, answer in results}
    assert len(answers) == 1  # the same batch, the same answers, drained or not
    assert sum(a == p.parent.name for a, p in zip(answers.pop(), photos)) >= BATCH - 2
    # the process and its workers are gone, and the port no longer takes connections
    pids = server.worker_pids() | {server.proc.pid}
    assert len(pids) == workers + (workers > 1)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port), timeout=5)
    stops = [a for a in server.audit_lines() if a["event"] == "serve.stop"]
    # A worker that served no batch reports no batch_requests key (counts list what happened).
    assert len(stops) == workers and sum(s["counts"].get("batch_requests", 0) for s in stops) == n
    assert "Traceback" not in out and "Cancel" not in out and KEY not in out
    print(f"\n{workers} worker(s): {in_flight_at_term} of {n} batches in flight at SIGTERM, "
          f"drained in {time.time() - t_term:.1f} s")
