#!/bin/bash
# EMR bootstrap action (runs on every node before Spark starts):
# install canestra from the wheel in S3 into its own Python 3.11 venv.
# Usage (set by the CloudFormation template): bootstrap.sh s3://BUCKET/artifacts/canestra-X-py3-none-any.whl
set -euo pipefail
WHEEL_URI="$1"
VENV=/opt/canestra/venv
CACHE=/opt/canestra/cache

# EMR 7 runs Amazon Linux 2023, whose default python3 is 3.9; canestra needs >= 3.10.
sudo dnf install -y -q python3.11 python3.11-pip
sudo mkdir -p /opt/canestra "$CACHE"
sudo python3.11 -m venv "$VENV"
tmp=$(mktemp -d)
aws s3 cp --only-show-errors "$WHEEL_URI" "$tmp/"
sudo "$VENV/bin/pip" install -q --upgrade pip
sudo "$VENV/bin/pip" install -q --no-deps "$tmp"/*.whl
# The cluster's own Spark 3.5 provides pyspark (on PYTHONPATH for every Spark Python
# process): install canestra's other runtime requirements only.
"$VENV/bin/python" - > "$tmp/requirements.txt" <<'PY'
from importlib.metadata import requires
for req in requires("canestra") or []:
    if "extra ==" not in req and not req.lower().startswith("pyspark"):
        print(req)
PY
sudo "$VENV/bin/pip" install -q -r "$tmp/requirements.txt"
# Build the ONNX graph once per node here rather than inside the first Spark task;
# Spark's executors (user yarn) read it from the shared cache.
sudo CANESTRA_CACHE_DIR="$CACHE" "$VENV/bin/python" -c "from canestra.vision import backbone; print(backbone.default_model_path())"
sudo chmod -R a+rX /opt/canestra
rm -rf "$tmp"
