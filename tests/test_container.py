"""The `canestra serve` container image (deploy/container/) and serving a model from S3.

The slow test builds the image with deploy/container/build.sh (podman, offline, from wheels made here), runs
it published on 127.0.0.1 only, non-root on a read-only root filesystem, and predicts through it: once with the
model baked into the image, once with ``--model s3://…`` from a moto S3 server on this machine's loopback.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import tomllib
from packaging.requirements import Requirement
from servers import free_port
from test_s3 import aws_env, moto  # noqa: F401  (the moto S3 server, credentials in env: fixtures)

from canestra.errors import InputError
from canestra.serve.predictor import OnlinePredictor, load_model_spec

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "deploy" / "container"
FIXTURE_MODEL = Path(__file__).parent / "fixtures" / "model-0.1.0"
BUCKET = "canestra-models-eu"
PODMAN_ENV = {**os.environ, "CONTAINERS_CONF": str(RECIPE / "containers.conf")}


def _pins() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in (RECIPE / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            spec = str(req.specifier)
            assert spec.startswith("==") and "," not in spec, f"{line}: the image pins exact versions"
            name = re.sub(r"[-_.]+", "-", req.name).lower()
            assert name not in pins, f"{name} is pinned twice"
            pins[name] = spec[2:]
    return pins


def test_image_pins_satisfy_the_package_ranges():
    """Every runtime requirement of canestra but pyspark and pandas, and the serve and s3 extras, is pinned
    inside its declared range: a floor raised in pyproject.toml fails here, not in a container."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = _pins()
    needed = [Requirement(r) for r in project["dependencies"]]
    needed = [r for r in needed if r.name not in ("pyspark", "pandas")]  # the Spark side; serve never imports them
    needed += [Requirement(r) for extra in ("serve", "s3") for r in project["optional-dependencies"][extra]]
    for req in needed:
        if req.marker and not req.marker.evaluate({"sys_platform": "linux", "extra": ""}):
            continue
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert name in pins, f"{req} is not pinned in deploy/container/requirements.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} is outside {req}"
    assert "pyspark" not in pins and "pandas" not in pins


# --------------------------------------------------------------------------- --model s3://… (no container)


def _upload(moto, model: Path, prefix: str, metrics: dict | None = None) -> str:
    s3c = moto.client("s3", "eu-west-3")
    if BUCKET not in [b["Name"] for b in s3c.list_buckets()["Buckets"]]:
        s3c.create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": "eu-west-3"})
    for p in sorted(model.rglob("*")):
        if p.is_file():
            s3c.put_object(Bucket=BUCKET, Key=f"{prefix}/model/{p.relative_to(model).as_posix()}", Body=p.read_bytes())
    if metrics is not None:
        s3c.put_object(Bucket=BUCKET, Key=f"{prefix}/metrics.json", Body=json.dumps(metrics).encode())
    return f"s3://{BUCKET}/{prefix}/model/"


def test_model_from_s3_is_served_from_a_private_copy(moto, sample_dir):
    uri = _upload(moto, FIXTURE_MODEL, "runs/s3-serve", metrics={"n": 66, "accuracy": 0.97})
    spec = load_model_spec(uri)
    local = load_model_spec(str(FIXTURE_MODEL))
    assert spec.version == local.version  # the same model files, byte for byte
    assert spec.metrics == {"n": 66, "accuracy": 0.97}  # the run's metrics.json beside model/
    copy = Path(spec.model_dir)
    assert oct(copy.parent.stat().st_mode & 0o777) == "0o700"
    assert not (copy / "canestra_training_ids.txt").exists()  # which photos it was fitted on stays in the bucket
    image = sorted((sample_dir / "Lemon").glob("*.jpg"))[0].read_bytes()
    a, b = (OnlinePredictor(s, threads=1).predict_bytes(image) for s in (spec, local))
    assert (a.label, a.image_id, a.top5) == (b.label, b.image_id, b.top5)

    # The copy lives as long as the process that made it.
    out = subprocess.run([sys.executable, "-c", "import sys; from canestra.serve.predictor import load_model_spec; "
                          "print(load_model_spec(sys.argv[1]).model_dir)", uri],
                         capture_output=True, text=True, timeout=120, check=True)
    made = Path(out.stdout.strip())
    assert made.name == "model" and not made.parent.exists()


def test_s3_prefix_without_a_model_is_refused_plainly(moto):
    s3c = moto.client("s3", "eu-west-3")
    uri = _upload(moto, FIXTURE_MODEL / "stages", "runs/not-a-model")  # stage folders, no top metadata/
    with pytest.raises(InputError, match="is not a saved canestra model"):
        load_model_spec(uri)
    with pytest.raises(InputError, match="is not a saved canestra model"):
        load_model_spec(f"s3://{BUCKET}/runs/nothing-here/model")
    # A key naming a file outside the model folder never lands outside the copy.
    uri = _upload(moto, FIXTURE_MODEL, "runs/escape")
    s3c.put_object(Bucket=BUCKET, Key="runs/escape/model/stages/../../../../../evil.txt", Body=b"x")
    with pytest.raises(InputError, match="leaves the model folder"):
        load_model_spec(uri)


def _fake_tools(bin_dir: Path, log: Path) -> dict[str, str]:
    """podman with no base image, apt-get naming this machine's mirrors, mmdebstrap that fails without a word."""
    scripts = {
        "podman": "exit 1\n",  # `podman image exists` -> no base image yet
        # a third-party repository first: not a Debian mirror
        "apt-get": "printf 'Nodesource https://deb.nodesource.com/node_20.x/\\nDebian http://mirror.test/debian/\\n"
                   "Debian http://mirror.test/debian-security/\\n'\n",
        "mmdebstrap": f'echo "$@" > {log}\nexit 1\n',
    }
    for name, body in scripts.items():
        (bin_dir / name).write_text("#!/bin/sh\n" + body)
        (bin_dir / name).chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": sys.executable}


def test_base_image_comes_from_apts_own_mirror_and_a_silent_failure_is_named(tmp_path):
    """The base is bootstrapped from the mirror apt uses (a commented snapshot URL in the sources, or a missing
    /etc/apt/sources.list, once made build.sh exit 1 with nothing printed); any step that fails silently is named."""
    log = tmp_path / "mmdebstrap-args"
    (tmp_path / "bin").mkdir()
    env = _fake_tools(tmp_path / "bin", log)
    env.pop("MIRROR", None)
    got = subprocess.run([str(RECIPE / "build.sh"), "--tag", "localhost/none:test"], capture_output=True, text=True,
                         timeout=60, env=env)
    assert got.returncode != 0
    args = log.read_text()
    assert "deb http://mirror.test/debian bookworm main" in args
    assert "deb http://mirror.test/debian-security bookworm-security main" in args
    assert "build.sh: line" in got.stderr and "mmdebstrap" in got.stderr, got.stderr


# --------------------------------------------------------------------------- the image (slow)


def _podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, check=check,
                          env=PODMAN_ENV)


def _wait_ready(url: str, name: str, timeout: float = 120) -> None:
    deadline, state = time.monotonic() + timeout, "?"
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=2, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        state = _podman("inspect", name, "--format", "{{.State.Status}}", check=False).stdout.strip()
        if state not in ("created", "running", "configured"):
            break
        time.sleep(0.05)
    raise AssertionError(f"container {name} is not ready ({state}): {_logs(name)[-3000:]}")


def _logs(name: str) -> str:
    got = _podman("logs", name, check=False)
    return got.stdout + got.stderr


@pytest.fixture(scope="module")
def podman() -> None:
    """Skips (before any model is trained) where the tools are missing."""
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed: apt-get install podman buildah mmdebstrap uidmap fuse-overlayfs "
                    "slirp4netns runc (.ci/run installs them)")
    if shutil.which("mmdebstrap") is None and _podman("image", "exists", "localhost/canestra-base:bookworm",
                                                      check=False).returncode != 0:
        pytest.skip("mmdebstrap is not installed and there is no base image: apt-get install mmdebstrap")


@pytest.fixture(scope="module")
def image(podman, trained):
    tag = f"localhost/canestra-serve:test-{os.getpid()}"
    started = time.monotonic()
    build = subprocess.run([str(RECIPE / "build.sh"), "--tag", tag, "--model", os.path.join(trained.out_dir, "model")],
                           capture_output=True, text=True, timeout=1500, env=PODMAN_ENV)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    size = int(_podman("image", "inspect", tag, "--format", "{{.Size}}").stdout)
    print(f"\ncontainer image {tag}: {size / 1e6:.0f} MB, built in {time.monotonic() - started:.0f} s")
    yield tag, size
    _podman("rmi", "--force", tag, check=False)


@pytest.mark.slow
def test_image_serves_baked_and_s3_models_non_root_read_only(image, trained, moto, sample_dir, tmp_path):
    tag, size = image
    inspected = json.loads(_podman("image", "inspect", tag).stdout)[0]
    assert inspected["Config"]["User"] == "10001:10001"
    assert "/readyz" in " ".join(inspected["Healthcheck"]["Test"])  # kept: build.sh builds --format docker
    expected = OnlinePredictor.from_model_dir(os.path.join(trained.out_dir, "model"), threads=1)
    photo = sorted((sample_dir / "Pineapple").glob("*.jpg"))[0].read_bytes()
    want = expected.predict_bytes(photo)

    key = "k" * 8 + os.urandom(16).hex()
    keys = tmp_path / "api-keys.txt"
    keys.write_text(key + "\n")
    os.chmod(keys, 0o444)  # the container's user (uid 10001) reads it through the bind mount
    port, name = free_port(), f"canestra-test-{os.getpid()}"
    # The product's form: --host 0.0.0.0 inside (the image's default), published on 127.0.0.1 only, API keys.
    started = time.monotonic()
    _podman("run", "--detach", "--name", name, "--read-only", "--publish", f"127.0.0.1:{port}:8000",
            "--volume", f"{keys}:/run/secrets/api-keys:ro", "--env", "CANESTRA_API_KEYS_FILE=/run/secrets/api-keys",
            tag)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_ready(base, name)
        cold_start = time.monotonic() - started  # podman run -> /readyz 200
        headers = {"Authorization": f"Bearer {key}"}
        r = httpx.post(base + "/v1/predict", files={"file": ("p.jpg", photo, "image/jpeg")}, headers=headers,
                       timeout=60, trust_env=False)
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["prediction"], body["image_id"], body["model_version"]) == (
            want.label, want.image_id, expected.spec.model_version) and body["prediction"] == "Pineapple"
        assert httpx.post(base + "/v1/predict", content=photo, timeout=60, trust_env=False).status_code == 401
        assert httpx.get(base + "/v1/model", headers=headers, timeout=10, trust_env=False).json()["metrics"]

        assert _podman("healthcheck", "run", name, check=False).returncode == 0  # the image's HEALTHCHECK
        assert _podman("exec", name, "id", "-u").stdout.strip() == "10001"
        assert _podman("exec", name, "touch", "/opt/canestra/x", check=False).returncode != 0  # read-only root
        for module in ("pyspark", "pandas"):  # the serving image holds no Spark side
            assert _podman("exec", name, "python", "-c", f"import {module}", check=False).returncode != 0
        assert _podman("exec", name, "test", "-e", "/opt/canestra/served/model/canestra_training_ids.txt",
                       check=False).returncode != 0

        _podman("stop", "--time", "40", name, timeout=60)  # SIGTERM: drain, then exit 0
        assert _podman("inspect", name, "--format", "{{.State.ExitCode}}").stdout.strip() == "0"
        records = [json.loads(ln) for ln in _logs(name).splitlines() if ln.startswith('{"actor"')]
        assert [(r["command"], r["status"]) for r in records] == [("serve", "ok")]  # audit record on stderr
    finally:
        _podman("rm", "--force", name, check=False)

    # --model s3://…: moto listens on this machine's 127.0.0.1 only, so the container shares the host's
    # network namespace and binds 127.0.0.1 itself (nothing else can reach it either).
    uri = _upload(moto, Path(trained.out_dir) / "model", "runs/container")
    port, name = free_port(), f"canestra-test-s3-{os.getpid()}"
    env = {"AWS_ACCESS_KEY_ID": moto.key_id, "AWS_SECRET_ACCESS_KEY": moto.secret, "AWS_EC2_METADATA_DISABLED": "true",
           "CANESTRA_S3_ENDPOINT_URL": moto.endpoint, "CANESTRA_ALLOW_HTTP_ENDPOINT": "1",
           "CANESTRA_HOST": "127.0.0.1", "CANESTRA_PORT": str(port)}
    started = time.monotonic()
    _podman("run", "--detach", "--name", name, "--read-only", "--network", "host",
            *[a for k, v in env.items() for a in ("--env", f"{k}={v}")], tag, "--model", uri)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_ready(base, name)
        s3_start = time.monotonic() - started
        r = httpx.post(base + "/v1/predict", content=photo, headers={"content-type": "image/jpeg"}, timeout=60,
                       trust_env=False)
        assert r.status_code == 200, r.text
        assert (r.json()["image_id"], r.json()["model_version"]) == (want.image_id, expected.spec.model_version)
        assert _podman("healthcheck", "run", name, check=False).returncode == 0  # CANESTRA_PORT is honoured
    finally:
        _podman("rm", "--force", name, check=False)
    print(f"container image {size / 1e6:.0f} MB, cold start {cold_start:.2f} s (model baked), {s3_start:.2f} s "
          "(--model s3://)")
