"""`canestra serve` as a real subprocess on a free 127.0.0.1 port, for the serve tests."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """Started on construction; ready once every worker logged `serve.start` and /readyz answers 200."""

    def __init__(self, model: str, *args: str, env: dict, workers: int = 1, timeout: float = 180):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "canestra.cli", "serve", "--model", model,
                                      "--port", str(self.port), "--workers", str(workers), "--threads", "1", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []
        # Read all the time: a server blocked on a full pipe would look like a hung server.
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self._reader.start()
        deadline = time.time() + timeout
        while len(self.worker_pids()) < workers or not self._ready():
            if self.proc.poll() is not None or time.time() >= deadline:
                self.proc.kill()
                self.wait(60)
                raise AssertionError(f"server did not come up: {self.output[-3000:]}")
            time.sleep(0.3)

    def _ready(self) -> bool:
        try:
            return httpx.get(self.base + "/readyz", timeout=2, trust_env=False).status_code == 200
        except httpx.HTTPError:
            return False

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def audit_lines(self) -> list[dict]:
        return [json.loads(ln) for ln in self.lines if ln.startswith('{"counts"')]

    def worker_pids(self) -> set[int]:
        return {a["pid"] for a in self.audit_lines() if a["event"] == "serve.start"}

    def wait(self, timeout: float) -> int:
        rc = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=30)
        return rc

    def stop(self) -> str:
        """Terminate (if still running) and return everything the server printed."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.wait(60)
        except subprocess.TimeoutExpired:  # never leave a server behind
            self.proc.kill()
            self.wait(60)
        return self.output
