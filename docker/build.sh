#!/usr/bin/env bash
# Build a vbon image on a machine without registry access or buildx:
#   docker/build.sh cpu|gpu [TAG] [extra docker build args...]
# - uses BuildKit (cache + secret mounts) through `docker buildx` when present, else through a
#   Docker CLI that still has the built-in BuildKit client (Debian's /usr/bin/docker 20.10);
# - builds the base image (debian:bookworm-slim) locally with debootstrap if it is missing;
# - stages local wheels (VBON_WHEELS_DIR, default /opt/wheels: the CPU torch wheel) into
#   build/docker-wheels, and passes the host CA bundle (VBON_CA_BUNDLE) as a build secret.
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE="${1:-cpu}"
TAG="${2:-vbon:$PROFILE}"
shift $(( $# > 2 ? 2 : $# ))
BASE_IMAGE="${VBON_BASE_IMAGE:-debian:bookworm-slim}"
CA_BUNDLE="${VBON_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
WHEELS="${VBON_WHEELS_DIR:-/opt/wheels}"

DOCKER=(docker)
if ! docker buildx version >/dev/null 2>&1; then
    if [[ -x /usr/bin/docker ]] && DOCKER_BUILDKIT=1 /usr/bin/docker build --help 2>/dev/null \
        | grep -q -- '--secret'; then
        DOCKER=(/usr/bin/docker)
    else
        echo "build: BuildKit is needed (docker buildx, or a Docker CLI 20.10 with DOCKER_BUILDKIT)" >&2
        exit 2
    fi
fi
export DOCKER_BUILDKIT=1

if ! "${DOCKER[@]}" image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    if ! "${DOCKER[@]}" pull "$BASE_IMAGE" >/dev/null 2>&1; then
        echo "build: no registry; making $BASE_IMAGE with debootstrap"
        command -v debootstrap >/dev/null || { echo "build: apt-get install -y debootstrap" >&2; exit 2; }
        MIRROR="${VBON_DEBIAN_MIRROR:-$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources \
            | awk '{print $2}' | head -1)}"
        MIRROR="${MIRROR:-http://deb.debian.org/debian}"
        ROOTFS="$(mktemp -d)"
        trap 'rm -rf "$ROOTFS"' EXIT
        nice -n 10 debootstrap --variant=minbase bookworm "$ROOTFS" "$MIRROR" >/dev/null
        tar -C "$ROOTFS" -c . | "${DOCKER[@]}" import - "$BASE_IMAGE" >/dev/null
        rm -rf "$ROOTFS"
        trap - EXIT
    fi
fi

mkdir -p build/docker-wheels
if [[ "$PROFILE" == cpu ]]; then
    find "$WHEELS" -maxdepth 1 -name 'torch-2.13.0+cpu-*.whl' -exec cp -u {} build/docker-wheels/ \; 2>/dev/null || true
    if ! ls build/docker-wheels/torch-*.whl >/dev/null 2>&1; then
        echo "build: no local CPU torch wheel in $WHEELS; set --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu" >&2
    fi
fi
SECRET=()
[[ -s "$CA_BUNDLE" ]] && SECRET=(--secret "id=pip_ca,src=$CA_BUNDLE")

exec nice -n 10 "${DOCKER[@]}" build -f "docker/Dockerfile.$PROFILE" -t "$TAG" \
    --build-arg "BASE_IMAGE=$BASE_IMAGE" "${SECRET[@]}" "$@" .
