"""Decode bombs against `canestra serve` (issue 20, finding 5): a few-kB PNG whose pixels decode to
100+ MB is refused from its header (413), large images are decoded off the event loop one at a time
per worker, and a worker's decode budget answers 503 with Retry-After instead of queueing memory."""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image
from procs import descendants
from servers import ServeProcess

from canestra.config import Settings

FIXTURE_MODEL = Path(__file__).parent / "fixtures" / "model-0.1.0"  # a real saved model: no Spark needed


def palette_bomb(side: int) -> bytes:
    """A palette PNG of side x side pixels, two colours, one transparent: a few kB, 4 bytes a pixel decoded."""
    img = Image.new("P", (side, side), 0)
    img.putpalette([255, 255, 255, 200, 30, 30])
    buf = io.BytesIO()
    img.save(buf, "PNG", optimize=True, transparency=0)
    return buf.getvalue()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    dest = tmp_path_factory.mktemp("bomb-model") / "model"
    shutil.copytree(FIXTURE_MODEL, dest)
    return str(dest)


@pytest.fixture(scope="module")
def lemon(sample_dir) -> bytes:
    return sorted((sample_dir / "Lemon").glob("*.jpg"))[0].read_bytes()


def _app(model_dir: str, **settings):
    from canestra.serve.app import create_app

    return create_app(model_dir, Settings.load(serve_threads=1, rate_limit=0, **settings))


def test_decoded_size_budget_answers_413_503_and_keeps_the_loop_free(model_dir, lemon):
    # 20 MB per image, 40 MB per worker. 2300 x 2300 palette + transparency: 21 MB decoded (4 bytes a
    # pixel) from an upload of a few kB; 2100 x 2100: 17.6 MB, within budget, two of them 35 MB.
    over, under = palette_bomb(2300), palette_bomb(2100)
    assert len(over) < 20_000 and len(under) < 20_000
    app = _app(model_dir, max_decoded_mb=20, worker_decoded_mb=40)

    async def scenario() -> dict:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
            out: dict = {"single": await http.post("/v1/predict", content=over, headers={"content-type": "image/png"})}
            out["batch"] = await http.post("/v1/predict/batch", files=[("file", ("a.png", over)),
                                                                       ("file", ("b.jpg", lemon))])
            out["whole"] = await http.post("/v1/predict/batch", files=[("file", (f"{i}.png", under)) for i in range(3)])
            # Two requests of 2 x 17.6 MB at once: the worker takes one, the other gets 503 at once.
            pair = [("file", ("a.png", under)), ("file", ("b.png", under))]
            done: list[str] = []

            async def timed(name: str, coro):
                r = await coro
                done.append(name)
                return r

            async def probe():
                await asyncio.sleep(0.05)  # the big single image is being decoded by then
                return await timed("healthz", http.get("/healthz"))

            out["concurrent"] = await asyncio.gather(timed("pair1", http.post("/v1/predict/batch", files=pair)),
                                                     timed("pair2", http.post("/v1/predict/batch", files=pair)))
            out["big_single"], out["healthz"] = await asyncio.gather(
                timed("big", http.post("/v1/predict", content=under, headers={"content-type": "image/png"})), probe())
            out["order"] = done[-2:]
            out["after"] = await http.post("/v1/predict", content=lemon, headers={"content-type": "image/jpeg"})
            out["counts"] = (await http.get("/healthz")).json()["requests"]
        return out

    from fastapi.testclient import TestClient

    with TestClient(app):  # runs the lifespan
        out = asyncio.run(scenario())
    single = out["single"]
    assert single.status_code == 413, single.text
    assert single.json()["detail"] == ("image too large when decoded: 21.16 MB (width x height x channels), "
                                       "the limit is 20 MB")
    batch = out["batch"].json()["results"]
    assert out["batch"].status_code == 200
    assert batch[0]["status"] == 413 and batch[0]["error"].startswith("image too large when decoded")
    assert batch[1]["status"] == 200 and batch[1]["prediction"] == "Lemon"
    whole = out["whole"]
    assert whole.status_code == 413 and whole.json()["detail"].startswith(
        "request too large when decoded: its images decode to 52.92 MB, a request may decode to at most 40 MB")
    statuses = sorted(r.status_code for r in out["concurrent"])
    assert statuses == [200, 503], [r.text[:200] for r in out["concurrent"]]
    busy = next(r for r in out["concurrent"] if r.status_code == 503)
    assert busy.headers["retry-after"] == "1" and busy.json()["detail"].startswith("busy:")
    ok = next(r for r in out["concurrent"] if r.status_code == 200).json()["results"]
    assert [it["status"] for it in ok] == [200, 200]
    # The big image was decoded in a thread: /healthz, sent while it was decoding, answered first.
    assert out["big_single"].status_code == 200 and out["healthz"].status_code == 200
    assert out["order"] == ["healthz", "big"]
    assert out["after"].status_code == 200 and out["after"].json()["prediction"] == "Lemon"
    assert out["counts"]["rejected_413"] == 2 and out["counts"]["rejected_503"] == 1


def _tree_rss_mb(pid: int) -> float:
    total = 0
    for p in [pid, *descendants(pid)]:
        try:
            with open(f"/proc/{p}/status") as fh:
                total += next(int(ln.split()[1]) for ln in fh if ln.startswith("VmRSS:"))
        except (OSError, StopIteration):
            pass
    return total / 1024


@pytest.mark.slow  # a 2-worker server under 20 s of bombs
def test_bomb_batches_for_20s_leave_health_memory_and_answers_intact(model_dir, lemon, tmp_path):
    bomb = palette_bomb(6324)  # 4,964 bytes; 6324 x 6324 = 39,992,976 pixels, just under the pixel limit
    near = palette_bomb(5600)  # 125 MB decoded: within the default 128 MB, decoded for real
    assert len(bomb) < 6000
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    server = ServeProcess(model_dir, "--rate-limit", "0", env=env, workers=2)
    stop = time.monotonic() + 20
    statuses: list[tuple[str, int, list[int]]] = []
    errors: list[str] = []
    health: list[float] = []
    rss: list[float] = []

    def client(kind: str, image: bytes, n: int) -> None:
        files = [("file", (f"{i}.png", image, "image/png")) for i in range(n)]
        with httpx.Client(base_url=server.base, trust_env=False, timeout=120) as http:
            while time.monotonic() < stop:
                try:
                    r = http.post("/v1/predict/batch", files=files)
                except httpx.HTTPError as exc:
                    errors.append(f"{kind}: {type(exc).__name__}")
                    continue
                items = [it["status"] for it in r.json()["results"]] if r.status_code == 200 else []
                statuses.append((kind, r.status_code, items))
                if r.status_code == 503:
                    assert r.headers.get("retry-after") == "1"
                    time.sleep(1)

    def prober() -> None:
        with httpx.Client(base_url=server.base, trust_env=False, timeout=30) as http:
            while time.monotonic() < stop + 2:
                t0 = time.monotonic()
                r = http.get("/healthz")
                health.append(time.monotonic() - t0 if r.status_code == 200 else 99.0)
                rss.append(_tree_rss_mb(server.proc.pid))
                time.sleep(0.2)

    threads = [threading.Thread(target=client, args=("bomb16", bomb, 16)) for _ in range(4)]
    threads += [threading.Thread(target=client, args=("near4", near, 4)) for _ in range(2)]
    threads.append(threading.Thread(target=prober))
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=180)
        with httpx.Client(base_url=server.base, trust_env=False, timeout=60) as http:
            after = http.post("/v1/predict", content=lemon, headers={"content-type": "image/jpeg"})
            after_batch = http.post("/v1/predict/batch", files=[("file", ("l.jpg", lemon))] * 3)
    finally:
        out = server.stop()
    codes = {code for _, code, _ in statuses}
    bomb_items = {s for kind, code, items in statuses if kind == "bomb16" and code == 200 for s in items}
    near_ok = sum(1 for kind, code, items in statuses if kind == "near4" and code == 200)
    print(f"\nrequests {len(statuses)}, statuses {sorted(codes)}, near-bomb batches decoded {near_ok}, "
          f"healthz max {max(health):.3f} s over {len(health)} probes, RSS peak {max(rss):.0f} MB")
    assert not errors, errors
    assert codes <= {200, 503}, statuses
    assert bomb_items == {413}  # every 6324 x 6324 bomb refused from its header, never decoded
    assert near_ok >= 1  # the near-bombs were decoded for real, within the budget
    assert all(items == [200] * 4 for kind, code, items in statuses if kind == "near4" and code == 200)
    assert max(health) < 1.0, f"/healthz took {max(health):.2f} s"
    assert max(rss) < 2500, f"the server's processes reached {max(rss):.0f} MB RSS"
    assert after.status_code == 200 and after.json()["prediction"] == "Lemon"
    assert after_batch.status_code == 200 and [it["prediction"] for it in after_batch.json()["results"]] == ["Lemon"] * 3
    assert "Traceback" not in out
