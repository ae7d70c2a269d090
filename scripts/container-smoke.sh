#!/usr/bin/env bash
# Proves that the Dockerfile builds and serves, on a machine without a Docker engine or registry access.
#
# Makes a minimal Debian base with debootstrap (base images cannot be pulled here), builds the Dockerfile
# on it with buildah, starts the image's own command with `buildah run` (chroot isolation, host network),
# waits for /health/ready, runs the image's HEALTHCHECK, segments a shipped example and checks the JSON
# and the returned mask (against the expert's), checks what the image holds and that the server writes
# nothing outside /tmp, stops it with SIGTERM, and removes everything it made.
#
# Needs root, Debian's apt and the package registries. Run as `make container-test`.
#   WBC_SMOKE_FLAVOURS="gpu cpu"  which images to build: gpu is the Dockerfile's default (onnxruntime-gpu,
#                                 serving on its CPU provider here), cpu the CPU flavour (onnxruntime)
#   WBC_SMOKE_KEEP=1              keep the base image and the layer cache for a faster next run
#   WBC_SMOKE_DIR=DIR             where the storage lives (default /var/tmp/wbc-container-smoke)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
read -r -a FLAVOURS <<<"${WBC_SMOKE_FLAVOURS:-gpu cpu}"
KEEP=${WBC_SMOKE_KEEP:-0}
STATE=${WBC_SMOKE_DIR:-/var/tmp/wbc-container-smoke}
SUITE=bookworm
MIRROR=${WBC_SMOKE_MIRROR:-http://deb.debian.org/debian}
CA_DIR=/etc/ssl/certs
READY_TIMEOUT=${WBC_SMOKE_READY_TIMEOUT:-180}
BASE=localhost/wbc-smoke-base:$SUITE
SAMPLE=$ROOT/examples/cellavision_050.png

step() { printf '\n==> [%4ds] %s\n' "$SECONDS" "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

[[ $EUID -eq 0 ]] || fail "run as root (apt-get, debootstrap and buildah need it)"
[[ -f $ROOT/weights/model.onnx && -f $ROOT/weights/model.json ]] \
    || fail "weights/model.onnx and weights/model.json must exist: the image ships them"
for flavour in "${FLAVOURS[@]}"; do
    [[ $flavour == gpu || $flavour == cpu ]] || fail "WBC_SMOKE_FLAVOURS: gpu or cpu, not '$flavour'"
done

step "tools: buildah, podman, debootstrap (Debian packages)"
for tool in buildah podman debootstrap curl python3 ps; do
    if ! command -v "$tool" >/dev/null; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            buildah podman debootstrap curl python3 procps >/dev/null
        break
    fi
done
buildah --version

# A storage of its own, so that the run neither sees nor touches other images on the machine.
STORE=(--root "$STATE/storage" --runroot "$STATE/run" --storage-driver overlay)
bah() { buildah "${STORE[@]}" "$@"; }
mkdir -p "$STATE"
WORK=$(mktemp -d "$STATE/work.XXXXXX")
chmod 755 "$WORK"  # the checks read it from inside the container, as the service user
CTR="" SERVER_PID=""

descendants() {
    local child
    for child in $(ps -o pid= --ppid "$1" 2>/dev/null); do
        descendants "$child"
        echo "$child"
    done
}

server_processes() {
    # The server's own processes: those that `buildah-chroot-exec` started, under `buildah run`.
    local pid parent
    for pid in $(descendants "$SERVER_PID"); do
        parent=$(ps -o ppid= -p "$pid" | tr -d ' ')
        [[ -n $parent && $(ps -o args= -p "$parent") == buildah-chroot-exec* ]] && echo "$pid"
    done
}

stop_server() {
    # SIGTERM to the server alone, as a container engine sends it, then wait for `buildah run`.
    [[ -n $SERVER_PID ]] || return 0
    local pids rc=0
    mapfile -t pids < <(server_processes)
    ((${#pids[@]} == 0)) || kill -TERM "${pids[@]}" 2>/dev/null || true
    for _ in $(seq 30); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 1; done
    if kill -0 "$SERVER_PID" 2>/dev/null; then
        rc=1
        mapfile -t pids < <(descendants "$SERVER_PID")
        kill -KILL "${pids[@]}" "$SERVER_PID" 2>/dev/null || true
    fi
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=""
    return "$rc"
}

remove_container() {
    [[ -z $CTR ]] || bah rm "$CTR" >/dev/null 2>&1 || true
    CTR=""
}

cleanup() {
    local rc=$?
    stop_server || true
    remove_container
    rm -rf "$WORK"
    if [[ $KEEP == 1 ]]; then
        bah rmi "${FLAVOURS[@]/#/localhost/wbc-segmenter:smoke-}" >/dev/null 2>&1 || true
    else
        bah rm --all >/dev/null 2>&1 || true
        bah rmi --all --force >/dev/null 2>&1 || true
        umount -R "$STATE/storage/overlay" 2>/dev/null || true
        rm -rf "$STATE"
    fi
    if [[ $rc -eq 0 ]]; then
        printf '\ncontainer smoke test passed (%s) in %ds\n' "${FLAVOURS[*]}" "$SECONDS"
    else
        printf '\ncontainer smoke test FAILED after %ds\n' "$SECONDS" >&2
    fi
}
trap cleanup EXIT

make_base() {
    step "base image $BASE (debootstrap $SUITE minbase with python3)"
    if bah inspect --type image "$BASE" >/dev/null 2>&1; then
        echo "reusing $BASE"
        return
    fi
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,passwd \
        "$SUITE" "$WORK/rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
        || { tail -20 "$WORK/debootstrap.log"; fail "debootstrap"; }
    rm -rf "$WORK"/rootfs/var/lib/apt/lists/* "$WORK"/rootfs/var/cache/apt/*.bin
    tar -C "$WORK/rootfs" -c . | podman "${STORE[@]}" import - "$BASE" >/dev/null
    rm -rf "$WORK/rootfs"
}

build_image() {  # flavour image
    local flavour=$1 image=$2 args=()
    step "build $image"
    [[ $flavour == cpu ]] && args+=(--build-arg "ONNXRUNTIME=onnxruntime==1.31.*")
    # The machine's CA bundle reaches pip through a build-time mount only; it is not part of the image.
    [[ -f $CA_DIR/ca-certificates.crt ]] \
        && args+=(--volume "$CA_DIR:$CA_DIR:ro" --build-arg "PIP_CERT=$CA_DIR/ca-certificates.crt")
    bah bud --isolation chroot --layers --format docker --pull=never --build-arg "BASE_IMAGE=$BASE" \
        "${args[@]}" --tag "$image" --file "$ROOT/Dockerfile" "$ROOT"
    bah images --format '{{.Name}}:{{.Tag}} {{.Size}}' "$image"
}

check_config() {  # image; sets CMD, HEALTH, UID_
    local image=$1 user
    step "image configuration"
    mapfile -t CMD < <(bah inspect --type image --format '{{range .Docker.Config.Cmd}}{{println .}}{{end}}' "$image")
    mapfile -t HEALTH < <(bah inspect --type image \
        --format '{{range .Docker.Config.Healthcheck.Test}}{{println .}}{{end}}' "$image")
    user=$(bah inspect --type image --format '{{.Docker.Config.User}}' "$image")
    UID_=${user%%:*}
    printf 'cmd: %s\nhealthcheck: %s\nuser: %s\n' "${CMD[*]}" "${HEALTH[*]}" "$user"
    [[ ${CMD[*]} == "python -m app" ]] || fail "the command is not python -m app"
    [[ ${HEALTH[0]:-} == CMD && ${HEALTH[*]} == */health/ready* ]] || fail "no HEALTHCHECK on /health/ready"
    [[ -n $UID_ && $UID_ != 0 && $UID_ != root ]] || fail "the image runs as root"
}

check_contents() {  # onnxruntime distribution
    step "contents: one onnxruntime ($1), no torch, no training code, no tests"
    bah run --isolation chroot "$CTR" -- python -c "
import importlib.metadata as md, importlib.util as u, os
names = {d.metadata['Name'].lower() for d in md.distributions()}
ort = sorted(n for n in names if n in ('onnxruntime', 'onnxruntime-gpu'))
print('onnxruntime distributions:', ort, '| uid', os.getuid(), '| cwd', os.getcwd(), sorted(os.listdir()))
assert ort == ['$1'], ort
assert 'torch' not in names and u.find_spec('torch') is None, 'torch is installed'
assert u.find_spec('model_training') is None, 'model_training is installed'
assert sorted(os.listdir()) == ['weights'], os.listdir()
assert os.getuid() != 0, 'runs as root'
import app.api.main
"
}

serve() {  # port
    step "serve on port $1: ${CMD[*]}"
    bah run --isolation chroot --env "WBC_PORT=$1" --env "WBC_HEADER_TIMEOUT_S=3" "$CTR" -- "${CMD[@]}" \
        >"$WORK/server.log" 2>&1 &
    SERVER_PID=$!
    local deadline=$((SECONDS + READY_TIMEOUT))
    until curl -fsS -o "$WORK/ready.json" "http://127.0.0.1:$1/health/ready" 2>/dev/null; do
        kill -0 "$SERVER_PID" 2>/dev/null || { cat "$WORK/server.log"; fail "the server exited before it was ready"; }
        ((SECONDS < deadline)) || { cat "$WORK/server.log"; fail "not ready after ${READY_TIMEOUT}s"; }
        sleep 2
    done
    echo "ready: $(cat "$WORK/ready.json")"
    curl -fsS "http://127.0.0.1:$1/health/live" >/dev/null || fail "/health/live"

    step "the image's HEALTHCHECK command, inside the container"
    bah run --isolation chroot --env "WBC_PORT=$1" "$CTR" -- "${HEALTH[@]:1}" \
        || fail "the HEALTHCHECK command failed against a ready server"
}

sample_image() {
    # A shipped example with its expert mask where there is one, else a drawn cell.
    if [[ -f $SAMPLE && -f $(dirname "$SAMPLE")/masks/$(basename "$SAMPLE") ]]; then
        cp "$SAMPLE" "$WORK/sample.png"
        cp "$(dirname "$SAMPLE")/masks/$(basename "$SAMPLE")" "$WORK/sample_mask.png"
        basename "$SAMPLE" >"$WORK/sample.name"
    else
        echo "a drawn cell" >"$WORK/sample.name"
        bah run --isolation chroot "$CTR" -- python -c "
import sys
from PIL import Image, ImageDraw
im = Image.new('RGB', (200, 180), (236, 222, 205))
d = ImageDraw.Draw(im)
d.ellipse((50, 40, 150, 140), fill=(205, 190, 225))
d.ellipse((75, 65, 125, 115), fill=(110, 60, 150))
im.save(sys.stdout.buffer, 'PNG')
" >"$WORK/sample.png"
    fi
}

check_segment() {  # port
    step "segment $(cat "$WORK/sample.name")"
    curl -sS -o "$WORK/segment.json" -w '%{http_code} %{content_type}\n' \
        -F "file=@$WORK/sample.png;type=image/png" "http://127.0.0.1:$1/v1/segment?include_mask=true" \
        | tee "$WORK/segment.status"
    # The container's own Pillow and numpy read the sample, the returned mask and the expert mask.
    bah run --isolation chroot --volume "$WORK:/smoke:ro" "$CTR" -- python -c "
import base64, io, json, os
import numpy as np
from PIL import Image
status = open('/smoke/segment.status').read().split()
body = json.load(open('/smoke/segment.json'))
print(json.dumps({k: body.get(k) for k in ('width', 'height', 'areas_px', 'nc_ratio', 'model')}))
assert status[0] == '200' and status[1].startswith('application/json'), status
with Image.open('/smoke/sample.png') as im:
    assert (body['width'], body['height']) == im.size, (body['width'], body['height'], im.size)
mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(body['mask_png_base64']))))
assert mask.shape == (body['height'], body['width']) and set(np.unique(mask)) <= {0, 1, 2}, mask.shape
areas = body['areas_px']
counted = {'cytoplasm': int((mask == 1).sum()), 'nucleus': int((mask == 2).sum()), 'cell': int((mask > 0).sum())}
assert areas == counted, (areas, counted)
if os.path.exists('/smoke/sample_mask.png'):
    expert = np.asarray(Image.open('/smoke/sample_mask.png')) > 64
    cell = mask > 0
    dice = 2 * (cell & expert).sum() / max(1, cell.sum() + expert.sum())
    print(f'cell Dice against the expert mask: {dice:.3f}')
    assert dice >= 0.8, 'the served segmentation is far from the expert mask'
print('segment JSON ok')
"
}

check_connections() {  # port
    step "connection limits of the image's server: a stalled head is cut, an oversized one refused"
    python3 - "$1" <<'PY' || fail "the server's connection limits do not hold"
import socket, sys, time
port = int(sys.argv[1])
stalled = socket.create_connection(("127.0.0.1", port))
stalled.sendall(b"POST /v1/segm")
stalled.settimeout(30)
began = time.monotonic()
assert stalled.recv(10) == b"", "a stalled request head was answered"
waited = time.monotonic() - began
assert waited < 10, f"a stalled request head was held {waited:.0f} s"
big = socket.create_connection(("127.0.0.1", port))
big.settimeout(30)
big.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Big: ")
try:
    for _ in range(16):
        big.sendall(b"a" * (1 << 20))
except OSError:
    pass
answer = big.recv(64)
assert answer == b"" or answer.startswith(b"HTTP/1.1 4"), answer
print(f"stalled head closed after {waited:.1f} s; a 16 MB header refused")
PY
}

check_writes() {
    step "nothing written outside /tmp by the service user (the root filesystem can be read-only)"
    local mnt written
    mnt=$(bah mount "$CTR")
    written=$(find "$mnt" -xdev -uid "$UID_" -not -path "$mnt/tmp/*" -not -path "$mnt/tmp" | head -20)
    bah umount "$CTR" >/dev/null
    [[ -z $written ]] || fail "files written outside /tmp: $written"
}

check_shutdown() {
    step "graceful shutdown on SIGTERM"
    # uvicorn finishes its shutdown, then re-raises SIGTERM: the exit status is the signal's, by design.
    stop_server || { cat "$WORK/server.log"; fail "the server ignored SIGTERM for 30s"; }
    grep -q "Application shutdown complete" "$WORK/server.log" \
        || { cat "$WORK/server.log"; fail "the server did not shut down gracefully"; }
    grep -E "Shutting down|shutdown complete|Finished server process" "$WORK/server.log"
}

make_base
for flavour in "${FLAVOURS[@]}"; do
    image=localhost/wbc-segmenter:smoke-$flavour
    ort=onnxruntime-gpu
    [[ $flavour == cpu ]] && ort=onnxruntime
    build_image "$flavour" "$image"
    check_config "$image"
    CTR=$(bah from --pull=never "$image")
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    check_contents "$ort"
    serve "$port"
    sample_image
    check_segment "$port"
    check_connections "$port"
    check_writes
    check_shutdown
    remove_container
done
