"""`canestra serve` latency and throughput on loopback, against bare ONNX Runtime in the same run.

(A) bare: the model's ONNX graph, one intra-op thread, ``session.run`` on the already
    decoded and resized image, in a process pinned to one core: p50/p95 per call, and
    the rate of one such process per core (1 core, 2 cores) running flat out.
(B) service: ``canestra serve --workers W --threads 1`` as a subprocess, driven by a
    small keep-alive HTTP client (raw image bodies, ``POST /v1/predict``):
    - latency: one request at a time; with W=1 the server is pinned to core 0 and the
      client to core 1, like the bare latency run;
    - throughput: a bounded load of ``--concurrency`` (default 2 x W) requests in flight
      for ``--seconds``; W=1 pinned as above, W=2 unpinned (the client shares the cores).
Bare and service runs alternate ``--rounds`` times (the server stays up); medians are reported.

Targets: p50 overhead (service p50 - bare p50, W=1) <= 3 ms; throughput with 2 workers
>= 80 % of the bare 2-core rate.

Without ``--model``, a small model is trained once on the bundled sample with
``canestra train --images sample/fruits-360 --pca-k 64 --max-iter 30`` and cached in
``~/.cache/canestra/bench-serve-model`` (``CANESTRA_CACHE_DIR``). ``--quick`` is a smoke run
(few requests, 1.5 s loads, one round): it checks the script end to end, not the figures.

    python bench/serve_latency.py [--model runs/demo/model] [--image FILE] [--requests 300]
                                  [--seconds 10] [--rounds 3] [--workers 1,2] [--quick] [--json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import benchlib
import numpy as np

TARGET_OVERHEAD_MS = 3.0
TARGET_THROUGHPUT_RATIO = 0.80
FULL = {"requests": 300, "seconds": 10.0, "rounds": 3}
QUICK = {"requests": 30, "seconds": 1.5, "rounds": 1}
QUICK_MODEL_ARGS = ["--pca-k", "64", "--max-iter", "30"]


# ---------------------------------------------------------------------------- bare ONNX Runtime


def _pin(core: int | None) -> None:
    if core is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {core})


def _bare_worker(model_dir: str, image: str, core: int | None, iterations: int, seconds: float,
                 start: mp.Event, out: mp.Queue) -> None:
    _pin(core)
    benchlib.setup_env()
    from canestra.serve.predictor import load_model_spec
    from canestra.vision import backbone
    from canestra.vision.images import decode_rgb

    spec = load_model_spec(model_dir)
    path = spec.onnx_path or backbone.default_model_path()
    sess = backbone.session(path, 1)
    rgb = decode_rgb(Path(image).read_bytes())
    x = [backbone.resize_rgb(rgb, s)[None] for s in spec.image_sizes]
    for _ in range(30):  # warm-up
        for xi in x:
            sess.run(["features"], {"image": xi})
    start.wait()
    times, n, t_end = [], 0, time.perf_counter() + seconds
    while (iterations and n < iterations) or (not iterations and time.perf_counter() < t_end):
        t0 = time.perf_counter()
        for xi in x:
            sess.run(["features"], {"image": xi})
        times.append(time.perf_counter() - t0)
        n += 1
    out.put(times)


def bare(model_dir: str, image: str, cores: list[int | None], iterations: int = 0, seconds: float = 0.0):
    """Run one pinned bare-ORT process per entry of ``cores`` at once; their per-call times."""
    ctx = mp.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_bare_worker, args=(model_dir, image, c, iterations, seconds, start, out))
             for c in cores]
    for p in procs:
        p.start()
    time.sleep(0.5)
    start.set()
    results = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    return results


# ---------------------------------------------------------------------------- HTTP client


class Conn:
    """A minimal HTTP/1.1 keep-alive client: the load generator must cost the shared cores little."""

    def __init__(self, port: int, body: bytes):
        self.port = port
        self.request = (f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: image/jpeg\r\n"
                        f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        self.reconnects = -1
        self._connect()

    def _connect(self) -> None:
        self.sock = socket.create_connection(("127.0.0.1", self.port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.reconnects += 1

    def post(self) -> tuple[int, bytes]:
        try:
            return self._post()
        except (ConnectionError, OSError):  # the server closed an idle keep-alive connection
            self.sock.close()
            self._connect()
            return self._post()

    def _post(self) -> tuple[int, bytes]:
        self.sock.sendall(self.request)
        while b"\r\n\r\n" not in self.buf:
            self.buf += self._recv()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        length = next(int(v) for k, v in (ln.split(b":", 1) for ln in lines[1:]) if k.strip().lower() == b"content-length")
        while len(self.buf) < length:
            self.buf += self._recv()
        body, self.buf = self.buf[:length], self.buf[length:]
        return status, body

    def _recv(self) -> bytes:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        return chunk

    def close(self) -> None:
        self.sock.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``canestra serve`` in a child process, ready once every worker has loaded the model."""

    def __init__(self, model_dir: str, workers: int, core: int | None, extra: tuple[str, ...] = ()):
        self.port = free_port()
        # --rate-limit 0: the load comes from one address, and the per-client limit is not what is measured.
        cmd = [sys.executable, "-m", "canestra.cli", "serve", "--model", model_dir, "--port", str(self.port),
               "--workers", str(workers), "--threads", "1", "--rate-limit", "0", *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     preexec_fn=(lambda: _pin(core)) if core is not None else None,
                                     env={**os.environ, "PYTHONPATH": str(benchlib.ROOT / "src")})
        # Each worker logs a `serve.start` audit line (with its pid) once its model is loaded and
        # warmed up; /readyz alone would only prove that the first worker is up.
        self.started: set[int] = set()
        self.tail: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()
        deadline = time.time() + 180
        while len(self.started) < workers or not self._ready():
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise SystemExit(f"canestra serve did not start (exit {self.proc.poll()}):\n" + "".join(self.tail))
            time.sleep(0.3)

    def _drain(self) -> None:
        for line in self.proc.stderr:  # keep reading, or a chatty server would block on a full pipe
            self.tail = (self.tail + [line])[-20:]
            if line.startswith("{") and '"serve.start"' in line:
                self.started.add(json.loads(line)["pid"])

    def _ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                return b" 200 " in s.recv(1024)
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:  # a worker stuck in shutdown: do not leave it running
            self.proc.kill()
            self.proc.wait()


def latency_run(port: int, body: bytes, n: int) -> tuple[list[float], list[float]]:
    """Sequential requests: client-side round trip times and the service's own timing_ms."""
    c = Conn(port, body)
    for _ in range(30):  # warm-up
        c.post()
    rtt, svc = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        status, resp = c.post()
        rtt.append(time.perf_counter() - t0)
        if status != 200:
            raise SystemExit(f"request failed: {status} {resp[:200]!r}")
        svc.append(json.loads(resp)["timing_ms"] / 1000)
    c.close()
    return rtt, svc


def throughput_run(port: int, body: bytes, concurrency: int, seconds: float) -> tuple[float, list[float]]:
    """``concurrency`` keep-alive connections, each one request in flight, for ``seconds``."""
    conns = [Conn(port, body) for _ in range(concurrency)]
    for c in conns:
        for _ in range(10):
            c.post()
    lat: list[list[float]] = [[] for _ in conns]
    errors = [0]
    t_end = time.perf_counter() + seconds

    def loop(i: int) -> None:
        c = conns[i]
        while time.perf_counter() < t_end:
            t0 = time.perf_counter()
            try:
                status, _ = c.post()
            except OSError:
                status = 0
            lat[i].append(time.perf_counter() - t0)
            errors[0] += status != 200

    t0 = time.perf_counter()
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    for c in conns:
        c.close()
    if errors[0]:
        raise SystemExit(f"{errors[0]} requests failed under load")
    all_lat = [x for xs in lat for x in xs]
    return len(all_lat) / elapsed, all_lat


def pct(values, q: float) -> float:
    return round(float(np.percentile(np.asarray(values) * 1000, q)), 3)


# ---------------------------------------------------------------------------- model


def quick_model() -> str:
    """A small model trained on the bundled sample, cached between runs; its model/ folder."""
    from canestra.errors import InputError
    from canestra.serve.predictor import load_model_spec
    from canestra.vision import backbone

    out = backbone.cache_dir() / "bench-serve-model"
    model = out / "model"
    try:
        load_model_spec(str(model))
        print(f"model: {model} (cached quick model; pass --model to measure another)")
        return str(model)
    except InputError:
        pass
    print(f"no --model: training a quick one on {benchlib.BUNDLED_SAMPLE} into {out} (a few minutes) ...", flush=True)
    cmd = [sys.executable, "-m", "canestra.cli", "train", "--images", str(benchlib.BUNDLED_SAMPLE), "--out", str(out),
           "--quiet", *QUICK_MODEL_ARGS]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(benchlib.ROOT / "src")})
    if r.returncode != 0:
        raise SystemExit(f"canestra train failed ({r.returncode}):\n{(r.stderr or r.stdout)[-2000:]}")
    return str(model)


# ---------------------------------------------------------------------------- main


def _affinity(cores: set[int] | None) -> None:
    """Pin this process (the load generator) to ``cores``; None = every core."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cores if cores is not None else set(range(os.cpu_count() or 1)))


def one_round(server: Server, model_dir: str, image: str, body: bytes, args, w: int, pinned: bool,
              srv_core: int | None, client_core: int | None, can_pin: bool) -> dict:
    """Bare ORT (latency, then rate on W cores), then the service (latency, then a bounded load)."""
    n_cores = min(w, os.cpu_count() or 1)
    (bare_lat,) = bare(model_dir, image, [srv_core], iterations=args.requests)
    per_proc = bare(model_dir, image, list(range(n_cores)) if can_pin else [None] * n_cores, seconds=args.seconds)
    bare_rate = sum(len(t) for t in per_proc) / args.seconds
    _affinity({client_core} if pinned else None)
    try:
        rtt, svc = latency_run(server.port, body, args.requests)
        conc = args.concurrency or 2 * w
        rate, load_lat = throughput_run(server.port, body, conc, args.seconds)
    finally:
        _affinity(None)
    return {"bare_p50": pct(bare_lat, 50), "bare_p95": pct(bare_lat, 95), "p50": pct(rtt, 50), "p95": pct(rtt, 95),
            "svc_p50": pct(svc, 50), "overhead_p50": round(pct(rtt, 50) - pct(bare_lat, 50), 3),
            "concurrency": conc, "rate": round(rate, 2), "bare_rate": round(bare_rate, 2),
            "ratio": round(rate / bare_rate, 4), "loaded_p50": pct(load_lat, 50), "loaded_p95": pct(load_lat, 95),
            "_bare_lat": bare_lat}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model/ folder written by `canestra train` (default: a cached quick model)")
    ap.add_argument("--image", help="image to send (default: a bundled Banana photo)")
    ap.add_argument("--requests", type=int, help=f"sequential requests per latency run (default {FULL['requests']})")
    ap.add_argument("--seconds", type=float, help=f"duration of each throughput run (default {FULL['seconds']:g})")
    ap.add_argument("--rounds", type=int, help=f"bare/service alternations per worker count (default {FULL['rounds']})")
    ap.add_argument("--workers", default="1,2", help="worker counts to measure, e.g. 1,2")
    ap.add_argument("--concurrency", type=int, help="requests in flight during throughput runs (default 2 x workers)")
    ap.add_argument("--quick", action="store_true",
                    help=f"smoke run: {QUICK['requests']} requests, {QUICK['seconds']:g} s loads, 1 round")
    ap.add_argument("--json", action="store_true", help="also print one JSON line")
    args = ap.parse_args()
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        workers = sorted({int(w) for w in args.workers.split(",")})
    except ValueError:
        raise SystemExit(f"--workers must be numbers like 1,2, got {args.workers!r}") from None
    if not workers or workers[0] < 1 or args.requests < 1 or args.seconds <= 0 or args.rounds < 1:
        raise SystemExit("--workers, --requests, --seconds and --rounds must be positive")
    benchlib.setup_env()
    model_dir = os.path.abspath(args.model) if args.model else quick_model()
    from canestra.errors import InputError
    from canestra.serve.predictor import load_model_spec

    try:
        spec = load_model_spec(model_dir)
    except InputError as exc:
        raise SystemExit(f"serve_latency: {exc}") from None
    image = os.path.abspath(args.image) if args.image else \
        str(sorted((benchlib.BUNDLED_SAMPLE / "Banana").glob("*.jpg"))[0])
    body = Path(image).read_bytes()
    cores = os.cpu_count() or 1
    can_pin = hasattr(os, "sched_setaffinity") and cores >= 2
    srv_core, client_core = (0, 1) if can_pin else (None, None)
    load_before = os.getloadavg()[0]

    rows, result_workers = [], {}
    bare_lat_all: list[float] = []
    bare_rates: dict[int, list[float]] = {}
    for w in workers:
        # W=1: server on core 0, client on core 1 (bare latency runs on core 0 too). W>1: the OS places
        # everything, the client shares the cores with the workers, as it would on a real 2-core host.
        pinned = w == 1 and can_pin
        server = Server(model_dir, w, srv_core if pinned else None)
        rounds = []
        try:
            for i in range(args.rounds):
                # Bare and service runs alternate, so a change in the machine's load hits both alike.
                r = one_round(server, model_dir, image, body, args, w, pinned, srv_core, client_core, can_pin)
                bare_lat_all += r.pop("_bare_lat")
                bare_rates.setdefault(min(w, cores), []).append(r["bare_rate"])
                rounds.append(r)
                print(f"  workers={w} round {i + 1}/{args.rounds}: p50 {r['p50']} ms (bare {r['bare_p50']} ms), "
                      f"{r['rate']:.1f} req/s (bare {r['bare_rate']:.1f} img/s)", flush=True)
        finally:
            server.stop()

        def med(key: str, rounds=rounds) -> float:
            return round(float(np.median([r[key] for r in rounds])), 3)

        res = {
            "pinned": pinned, "p50_ms": med("p50"), "p95_ms": med("p95"), "service_p50_ms": med("svc_p50"),
            "bare_p50_ms": med("bare_p50"), "overhead_p50_ms": med("overhead_p50"),
            "concurrency": rounds[0]["concurrency"], "throughput_rps": round(med("rate"), 1),
            "loaded_p50_ms": med("loaded_p50"), "loaded_p95_ms": med("loaded_p95"),
            "bare_rate": round(med("bare_rate"), 1), "throughput_ratio": round(med("ratio"), 3), "rounds": rounds,
        }
        result_workers[str(w)] = res
        rows.append([w, "core 0 (client core 1)" if pinned else "any", res["p50_ms"], res["p95_ms"],
                     res["service_p50_ms"], res["bare_p50_ms"], res["overhead_p50_ms"], res["concurrency"],
                     res["throughput_rps"], res["loaded_p50_ms"], res["loaded_p95_ms"], res["bare_rate"],
                     f"{100 * res['throughput_ratio']:.0f}%"])

    bare_p50, bare_p95 = pct(bare_lat_all, 50), pct(bare_lat_all, 95)
    overhead = result_workers["1"]["overhead_p50_ms"] if "1" in result_workers else None
    ratio2 = result_workers.get("2", {}).get("throughput_ratio")
    root = str(benchlib.ROOT) + os.sep
    result = {
        "model": model_dir, "model_version": spec.model_version, "model_image_sizes": list(spec.image_sizes),
        "pca_k": int(spec.pca.shape[1]), "classes": len(spec.labels),
        "image": image[len(root):] if image.startswith(root) else image, "image_bytes": len(body),
        "quick": args.quick, "requests": args.requests, "seconds": args.seconds, "rounds": args.rounds,
        "pinned": can_pin, "load_avg_before": round(load_before, 2), "load_avg_after": round(os.getloadavg()[0], 2),
        "bare": {"p50_ms": bare_p50, "p95_ms": bare_p95, "threads": 1,
                 "rate_by_cores": {str(k): round(float(np.median(v)), 1) for k, v in bare_rates.items()}},
        "workers": result_workers,
        "overhead_p50_ms": overhead, "overhead_target_ms": TARGET_OVERHEAD_MS,
        "overhead_ok": overhead is not None and overhead <= TARGET_OVERHEAD_MS,
        "throughput_ratio_2w": ratio2, "throughput_target": TARGET_THROUGHPUT_RATIO,
        "throughput_ok": ratio2 is not None and ratio2 >= TARGET_THROUGHPUT_RATIO,
    }
    print(f"\nimage {result['image']} ({len(body)} bytes), model {spec.model_version} "
          f"(input {result['model_image_sizes']} px, PCA {result['pca_k']}, {result['classes']} classes), "
          f"medians of {args.rounds} round(s)")
    print(f"bare ONNX Runtime (1 thread{', pinned to one core' if can_pin else ''}): p50 {bare_p50} ms, "
          f"p95 {bare_p95} ms; rate " + ", ".join(f"{v} img/s on {k} core(s)"
                                                   for k, v in result["bare"]["rate_by_cores"].items()))
    print(benchlib.table(rows, ["workers", "server cpu", "p50 ms", "p95 ms", "in-service p50", "bare p50",
                                "overhead", "in flight", "req/s", "loaded p50", "loaded p95", "bare img/s",
                                "vs bare"]))
    if overhead is not None:
        print(f"service overhead (p50, 1 worker - bare): {overhead:.2f} ms "
              f"[target <= {TARGET_OVERHEAD_MS:g} ms: {'ok' if result['overhead_ok'] else 'MISSED'}]")
    if ratio2 is not None:
        print(f"throughput with 2 workers: {100 * ratio2:.0f}% of bare ORT on {min(2, cores)} core(s) "
              f"[target >= {100 * TARGET_THROUGHPUT_RATIO:.0f}%: {'ok' if result['throughput_ok'] else 'MISSED'}]")
    print(f"load average before/after: {result['load_avg_before']} / {result['load_avg_after']}")
    benchlib.record("serve_latency", result, args.json)


if __name__ == "__main__":
    main()
