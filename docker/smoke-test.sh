#!/usr/bin/env bash
# `make docker-test`: build the CPU image and check it for real on the local Docker engine:
# start dockerd if it is not running, build the base image if missing, build vbon:cpu, run it
# with the model (and a real LoRA adapter) in volumes, wait for its HEALTHCHECK, make one BoN
# and one vBoN request, clean everything up (dockerd too, when this script started it).
# Env: VBON_TEST_IMAGE (default vbon:cpu), VBON_SMOKE_TIMEOUT_S (default 420), PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE="${VBON_TEST_IMAGE:-vbon:cpu}"
TIMEOUT="${VBON_SMOKE_TIMEOUT_S:-420}"
PY="${PYTHON:-.venv/bin/python}"
MODEL_DIR="${VBON_SMOKE_MODEL_DIR:-models/smollm2-135m-instruct}"
NAME="vbon-smoke-$$"
VOL_MODELS="$NAME-models"
VOL_ADAPTERS="$NAME-adapters"
WORK="$(mktemp -d)"
# The image binds 0.0.0.0, where the gateway refuses to start without a key.
KEY="smoke-$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')"
AUTH="Authorization: Bearer $KEY"
DOCKERD_PID=""
t0=$SECONDS
step() { printf '[docker-test %4ds] %s\n' "$((SECONDS - t0))" "$*"; }

cleanup() {
    rc=$?
    if [[ $rc -ne 0 ]] && docker inspect "$NAME" >/dev/null 2>&1; then
        echo "---- container log (last 40 lines) ----"; docker logs --tail 40 "$NAME" 2>&1 || true
    fi
    docker rm -f -v "$NAME" >/dev/null 2>&1 || true  # -v: its anonymous /runs volume
    docker volume rm "$VOL_MODELS" "$VOL_ADAPTERS" >/dev/null 2>&1 || true
    rm -rf "$WORK"
    if [[ -n "$DOCKERD_PID" ]]; then
        step "stopping the dockerd this test started (pid $DOCKERD_PID)"
        kill "$DOCKERD_PID" 2>/dev/null || true
        wait "$DOCKERD_PID" 2>/dev/null || true
    fi
    exit $rc
}
trap cleanup EXIT

if ! docker info >/dev/null 2>&1; then
    command -v dockerd >/dev/null || { echo "docker-test: no Docker engine (apt-get install -y docker.io)" >&2; exit 2; }
    step "starting dockerd"
    dockerd >"$WORK/dockerd.log" 2>&1 &
    DOCKERD_PID=$!
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
    docker info >/dev/null 2>&1 || { cat "$WORK/dockerd.log"; exit 2; }
fi

step "building $IMAGE"
tb=$SECONDS
docker/build.sh cpu "$IMAGE" >"$WORK/build.log" 2>&1 || { tail -30 "$WORK/build.log"; exit 1; }
step "image built in $((SECONDS - tb)) s ($(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.2f GB", $1/1e9}'))"

[[ -f "$MODEL_DIR/config.json" ]] || "$PY" -m vbon.models prepare
step "model and a real LoRA adapter into volumes"
"$PY" -c "import sys; from pathlib import Path; from tests.adapters_util import make_peft_adapter as m; \
m(Path(sys.argv[1]), Path(sys.argv[2]), n=8)" "$MODEL_DIR" "$WORK/vbon-n8" 2>/dev/null
docker volume create "$VOL_MODELS" >/dev/null
docker volume create "$VOL_ADAPTERS" >/dev/null
# Copied in as root and handed to the image's user (uid 10001), whatever the host's modes are.
docker run --rm --user 0 --entrypoint sh \
    -v "$PWD/$MODEL_DIR:/src/model:ro" -v "$WORK/vbon-n8:/src/adapter:ro" \
    -v "$VOL_MODELS:/models" -v "$VOL_ADAPTERS:/adapters" "$IMAGE" -c \
    'cp -r /src/model /models/smollm2-135m-instruct && cp -r /src/adapter /adapters/vbon-n8 \
     && chown -R 10001:10001 /models /adapters'

step "starting the gateway container"
tr=$SECONDS
# vLLM's engine process talks to the server through /dev/shm (Docker's default 64 MB is too small).
docker run -d --name "$NAME" -p 127.0.0.1::8000 --shm-size=1g \
    -v "$VOL_MODELS:/models:ro" -v "$VOL_ADAPTERS:/adapters:ro" \
    -e VBON_MODEL=/models/smollm2-135m-instruct -e VBON_KV_CACHE_GB=1 -e VBON_API_KEY="$KEY" \
    "$IMAGE" nice -n 10 python -m server >/dev/null
PORT="$(docker port "$NAME" 8000/tcp | head -1 | sed 's/.*://')"
URL="http://127.0.0.1:$PORT"
while :; do
    status="$(docker inspect -f '{{.State.Health.Status}}' "$NAME")"
    [[ "$status" == healthy ]] && break
    [[ "$(docker inspect -f '{{.State.Running}}' "$NAME")" == true ]] || { echo "container exited"; exit 1; }
    (( SECONDS - tr < TIMEOUT )) || { echo "not healthy after $TIMEOUT s ($status)"; exit 1; }
    # The gateway stays up when its engine fails to start; /ready says why: stop waiting then.
    reason="$(curl -s --max-time 3 -H "$AUTH" "$URL/ready" || true)"
    [[ "$reason" != *"startup failed"* ]] || { echo "gateway start-up failed: $reason"; exit 1; }
    sleep 2
done
step "healthy after $((SECONDS - tr)) s; user: $(docker exec "$NAME" id -u)"
[[ "$(docker exec "$NAME" id -u)" != 0 ]] || { echo "the container runs as root"; exit 1; }

request() {  # path, json -> prints a one-line summary, fails on non-200
    local out; out="$WORK/resp.json"
    local t1=$SECONDS code
    code="$(curl -s -o "$out" -w '%{http_code}' -H 'Content-Type: application/json' -H "$AUTH" \
        --max-time 300 -d "$2" "$URL$1")"
    [[ "$code" == 200 ]] || { echo "$1 -> HTTP $code: $(cat "$out")"; exit 1; }
    step "$1 -> 200 in $((SECONDS - t1)) s: $("$PY" -c "import json,sys; b=json.load(open(sys.argv[1])); \
print(json.dumps({k: b.get(k) for k in ('model', 'n', 'reward', 'text')})[:300])" "$out")"
}
MSG='"messages": [{"role": "user", "content": "Continue this movie review in one or two sentences: The film was"}]'
request /v1/bon "{$MSG, \"n\": 4, \"max_tokens\": 24, \"seed\": 1}"
request /v1/vbon "{$MSG, \"adapter\": \"vbon-n8\", \"max_tokens\": 24, \"score\": true}"
step "docker-test passed"
