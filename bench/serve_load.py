"""Load and soak test of `canestra serve`: many concurrent clients, a mix of good and bad uploads.

``--clients`` keep-alive connections (default 32) share ``--requests`` requests (default 10,000)
against ``canestra serve --workers W --worker-threads 1`` on loopback, each one raw ``POST /v1/predict``:

- 88 % photos of the bundled sample (answered 200),
- 10 % garbage (random bytes, text, a truncated JPEG, an empty body, a JPEG header then noise:
  415 or 422),
- 2 % oversize (1.5 x ``--max-upload-mb``, answered 413 from its ``Content-Length``).

Reported: requests/s, p50/p99 latency (all requests and photos only), statuses, 5xx count, an
answer other than the expected one, dropped connections (a request that got no response), and the
resident memory (RSS) of the server processes at the start, middle and end of the run: a leak
shows as growth from middle to end. The server runs with ``--rate-limit 0`` (serve_latency.Server): every client comes
from 127.0.0.1, so the per-client limit (on by default) would answer most of the load with 429.

Without ``--model`` it uses serve_latency.py's cached quick model (trained on the first run).

    python bench/serve_load.py [--model runs/demo/model] [--requests 10000] [--clients 32]
                               [--workers 2] [--max-upload-mb 1] [--quick] [--json]
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import threading
import time

import benchlib
import serve_latency
from serve_latency import Conn, Server, pct

QUICK = {"requests": 300, "clients": 8}
GARBAGE_SHARE, OVERSIZE_SHARE = 0.10, 0.02


def request_plan(n: int, limit_bytes: int, seed: int = 7) -> list[tuple[str, bytes]]:
    """``n`` (kind, body) pairs in a shuffled, seeded order: photos, garbage and oversize uploads."""
    rng = random.Random(seed)
    photos = [p.read_bytes() for p in sorted(benchlib.BUNDLED_SAMPLE.glob("*/*.jpg"))[::8]]
    jpeg = photos[0]
    garbage = [rng.randbytes(5000), b"these are my notes, not a picture\n" * 40, jpeg[: len(jpeg) // 2], b"",
               jpeg[:600] + rng.randbytes(3000)]
    oversize = rng.randbytes(limit_bytes * 3 // 2)
    n_garbage, n_oversize = round(n * GARBAGE_SHARE), round(n * OVERSIZE_SHARE)
    plan = ([("oversize", oversize)] * n_oversize + [("garbage", garbage[i % len(garbage)]) for i in range(n_garbage)]
            + [("photo", photos[i % len(photos)]) for i in range(n - n_garbage - n_oversize)])
    rng.shuffle(plan)
    return plan


EXPECTED = {"photo": {200}, "garbage": {415, 422}, "oversize": {413}}


class LoadConn(Conn):
    """serve_latency's keep-alive client, with a body per request and no silent retry."""

    def send(self, body: bytes) -> int:
        self.request = (f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nContent-Type: image/jpeg\r\n"
                        f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        return self._post()[0]


def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:")) / 1024
    except (OSError, StopIteration):
        return 0.0


def server_pids(root: int) -> list[int]:
    """The server process and its descendants (the uvicorn workers)."""
    pids, i = [root], 0
    while i < len(pids):
        try:
            for task in os.listdir(f"/proc/{pids[i]}/task"):
                with open(f"/proc/{pids[i]}/task/{task}/children") as fh:
                    pids += [int(p) for p in fh.read().split()]
        except OSError:
            pass
        i += 1
    return pids


def rss_snapshot(root: int) -> dict:
    per = {pid: round(rss_mb(pid), 1) for pid in server_pids(root)}
    return {"total_mb": round(sum(per.values()), 1), "per_process_mb": per}


def run_load(port: int, plan: list[tuple[str, bytes]], clients: int, root_pid: int) -> dict:
    todo = iter(enumerate(plan))
    lock = threading.Lock()
    lat: dict[str, list[float]] = collections.defaultdict(list)
    statuses: collections.Counter = collections.Counter()
    unexpected: collections.Counter = collections.Counter()
    dropped = [0]
    rss = {"start": rss_snapshot(root_pid)}
    middle = len(plan) // 2

    def worker() -> None:
        conn = LoadConn(port, b"")
        while True:
            with lock:
                item = next(todo, None)
            if item is None:
                break
            i, (kind, body) = item
            if i == middle:
                rss["middle"] = rss_snapshot(root_pid)
            t0 = time.perf_counter()
            try:
                status = conn.send(body)
            except OSError:  # reset, or closed without an answer: a dropped connection
                status = 0
                conn.sock.close()
                conn._connect()
            elapsed = time.perf_counter() - t0
            with lock:
                statuses[status] += 1
                if status == 0:
                    dropped[0] += 1
                else:
                    lat[kind].append(elapsed)
                    if status not in EXPECTED[kind]:
                        unexpected[f"{kind}:{status}"] += 1
        conn.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    rss["end"] = rss_snapshot(root_pid)
    every = [x for xs in lat.values() for x in xs]
    return {"wall_s": round(wall, 2), "rps": round(len(plan) / wall, 1),
            "p50_ms": pct(every, 50), "p99_ms": pct(every, 99),
            "photo_p50_ms": pct(lat["photo"], 50), "photo_p99_ms": pct(lat["photo"], 99),
            "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "errors_5xx": sum(v for k, v in statuses.items() if k >= 500), "unexpected": dict(unexpected),
            "dropped_connections": dropped[0], "kinds": dict(collections.Counter(k for k, _ in plan)), "rss": rss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model/ folder written by `canestra train` (default: serve_latency's quick model)")
    ap.add_argument("--requests", type=int, help="requests in all (default 10000)")
    ap.add_argument("--clients", type=int, help="concurrent keep-alive connections (default 32)")
    ap.add_argument("--workers", type=int, default=2, help="server worker processes (default 2)")
    ap.add_argument("--max-upload-mb", type=float, default=1.0,
                    help="the server's upload limit; oversize bodies are 1.5 x this (default 1)")
    ap.add_argument("--quick", action="store_true",
                    help=f"smoke run: {QUICK['requests']} requests from {QUICK['clients']} clients")
    ap.add_argument("--json", action="store_true", help="also print one JSON line")
    args = ap.parse_args()
    args.requests = args.requests or (QUICK["requests"] if args.quick else 10_000)
    args.clients = args.clients or (QUICK["clients"] if args.quick else 32)
    if args.requests < 1 or args.clients < 1 or args.workers < 1 or args.max_upload_mb <= 0:
        raise SystemExit("--requests, --clients, --workers and --max-upload-mb must be positive")
    benchlib.setup_env()
    model_dir = os.path.abspath(args.model) if args.model else serve_latency.quick_model()
    plan = request_plan(args.requests, int(args.max_upload_mb * 1_000_000))
    load_before = os.getloadavg()[0]
    server = Server(model_dir, args.workers, None, extra=("--max-upload-mb", str(args.max_upload_mb)))
    try:
        res = run_load(server.port, plan, args.clients, server.proc.pid)
    finally:
        server.stop()
    rss = res["rss"]
    growth = rss["end"]["total_mb"] - rss["middle"]["total_mb"] if "middle" in rss else None
    result = {"model": model_dir, "requests": args.requests, "clients": args.clients, "workers": args.workers,
              "max_upload_mb": args.max_upload_mb, "quick": args.quick, "load_avg_before": round(load_before, 2),
              "load_avg_after": round(os.getloadavg()[0], 2), "rss_growth_middle_to_end_mb": growth, **res}
    print(f"{args.requests} requests from {args.clients} clients to {args.workers} worker(s) in {res['wall_s']} s: "
          f"{res['rps']} req/s; mix {res['kinds']}")
    print(benchlib.table([["all", res["p50_ms"], res["p99_ms"]], ["photos", res["photo_p50_ms"], res["photo_p99_ms"]]],
                         ["requests", "p50 ms", "p99 ms"]))
    print(f"statuses {res['statuses']}; 5xx {res['errors_5xx']}; unexpected answers {res['unexpected'] or 0}; "
          f"dropped connections {res['dropped_connections']}")
    print("server RSS (MB, all processes): " + ", ".join(f"{k} {v['total_mb']}" for k, v in rss.items())
          + (f"; middle -> end {growth:+.1f} MB" if growth is not None else ""))
    print(f"load average before/after: {result['load_avg_before']} / {result['load_avg_after']}")
    benchlib.record("serve_load", result, args.json)


if __name__ == "__main__":
    main()
