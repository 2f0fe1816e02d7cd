#!/usr/bin/env bash
# Build the `canestra serve` container image offline (docs/container.md).
#
#   deploy/container/build.sh [--tag NAME] [--model DIR/model] [--base IMAGE]
#
# 1. Base image: IMAGE if given, else localhost/canestra-base:bookworm, made once with mmdebstrap from the
#    Debian mirror in /etc/apt/sources.list.d (no image registry needed) and `podman import`ed.
# 2. Wheels on this machine: canestra itself (`pip wheel`, from a clean copy of the tree) and exactly the pins
#    of requirements.txt (binary wheels for the image's Python 3.11 on glibc, whatever Python runs here).
# 3. `podman build --network none`: the image installs those wheels with --no-index and nothing else.
# --model bakes a saved model into the image (served by default); without it, pass --model at `podman run`.
#
# Environment: PYTHON (default .venv/bin/python), MIRROR (Debian mirror URL), SOURCE_DATE_EPOCH (base files'
# and image timestamps; default: the last commit's time), CONTAINERS_CONF (default containers.conf here:
# runc and ulimits these VMs accept).
set -euo pipefail
# A step that fails without a word (a pipeline under pipefail, say) still says which one it was.
trap 'echo "build.sh: line $LINENO failed (exit $?): $BASH_COMMAND" >&2' ERR

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
tag="localhost/canestra-serve:latest"
base=""
model=""
while [ $# -gt 0 ]; do
  case "$1" in
    --tag) tag="$2"; shift 2 ;;
    --model) model="$2"; shift 2 ;;
    --base) base="$2"; shift 2 ;;
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0"; exit 0 ;;
    *) echo "build.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

export CONTAINERS_CONF="${CONTAINERS_CONF:-$here/containers.conf}"
python="${PYTHON:-$root/.venv/bin/python}"
export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(git -C "$root" log -1 --format=%ct 2>/dev/null || echo 0)}"
for tool in podman "$python"; do
  command -v "$tool" >/dev/null || { echo "build.sh: $tool not found" >&2; exit 2; }
done

if [ -z "$base" ]; then
  base="localhost/canestra-base:bookworm"
  if ! podman image exists "$base"; then
    command -v mmdebstrap >/dev/null || { echo "build.sh: mmdebstrap not found (apt-get install mmdebstrap)" >&2; exit 2; }
    # The machine's own Debian mirror as apt itself reads it (deb822 or one-line sources, comments skipped: a
    # commented snapshot URL was once taken for the mirror), its security suite beside it.
    # Debian's own archive only (a third-party repository, such as nodesource, is not a Debian mirror).
    mirror="${MIRROR:-$(apt-get indextargets --format '$(ORIGIN) $(REPO_URI)' 2>/dev/null \
      | awk '$1 == "Debian" && $2 !~ /security/ {print $2; exit}' || true)}"
    mirror="${mirror:-http://deb.debian.org/debian}"
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$work/base.tar" \
      "deb ${mirror%/} bookworm main" "deb ${mirror%/} bookworm-updates main" \
      "deb ${mirror%/}-security bookworm-security main"
    podman import --change 'CMD ["/bin/bash"]' "$work/base.tar" "$base" >/dev/null
    rm -rf "$work"
    trap - EXIT
  fi
fi

ctx="$(mktemp -d)"
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/wheels" "$ctx/canestra" "$ctx/src" "$ctx/served/model"
cp "$here/Containerfile" "$here/requirements.txt" "$ctx/"

# canestra from a clean copy: pip builds in-tree, and a stale build/lib would slip removed modules in.
cp "$root/pyproject.toml" "$root/README.md" "$ctx/src/"
cp -r "$root/src" "$ctx/src/src"
find "$ctx/src" \( -name __pycache__ -o -name '*.egg-info' \) -prune -exec rm -rf {} +
"$python" -m pip wheel -q --no-deps --no-build-isolation -w "$ctx/canestra" "$ctx/src"
rm -rf "$ctx/src"
# The pins, as binary wheels for CPython 3.11 on Debian bookworm (glibc 2.36) on this machine's architecture.
arch="$(uname -m)"
platforms=(--platform "manylinux2014_$arch")
for minor in $(seq 17 36); do platforms+=(--platform "manylinux_2_${minor}_$arch"); done
"$python" -m pip download -q --no-deps --only-binary=:all: --implementation cp --python-version 3.11 \
  "${platforms[@]}" -d "$ctx/wheels" -r "$here/requirements.txt"

if [ -n "$model" ]; then
  # The model's own files; its training-id list (personal data, for erasure) stays out of the image.
  [ -d "$model/metadata" ] || { echo "build.sh: $model is not a model/ folder written by canestra train" >&2; exit 2; }
  cp -r "$model/." "$ctx/served/model/"
  rm -f "$ctx/served/model/canestra_training_ids.txt"
  find "$ctx/served/model" -name '*.crc' -delete
  # its held-out figures, shown by GET /v1/model
  if [ -f "$model/../metrics.json" ]; then cp "$model/../metrics.json" "$ctx/served/"; fi
fi

podman build --quiet --pull=never --network none --format docker --timestamp "$SOURCE_DATE_EPOCH" \
  --build-arg "BASE=$base" --tag "$tag" "$ctx"
