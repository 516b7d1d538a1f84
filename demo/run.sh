#!/usr/bin/env bash
# `make demo`: the main job end to end on this machine, in a few minutes on 2 CPU cores.
#
#   data (generated textured classes, or 3 AID classes from DATA) → terratile-export train →
#   terratile-export bundle → mosquitto → terratile run → drop a GeoTIFF into the inbox →
#   print the MQTT result → point at the dashboard → stop everything (KEEP=1: keep the
#   daemon and the dashboard up until Ctrl-C).
#
# Everything lives in .demo/. Training and bundling are skipped when their outputs exist
# (delete .demo/ to redo them); the appliance state is fresh on every run so the scene is
# really processed. Env: DATA (ImageFolder root, e.g. ../shared/data/aid), SCENE (a
# GeoTIFF to drop instead of the generated one), DEMO_CLASSES (AID classes to use),
# HTTP_PORT (the dashboard's port, default 8780), KEEP (1: stay up at the end).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
BIN="$ROOT/.venv/bin"
PY="$BIN/python"
DEMO="$ROOT/.demo"
BOX="$DEMO/box"
NODE=demo
DATA="${DATA:-}"
SCENE="${SCENE:-}"
DEMO_CLASSES="${DEMO_CLASSES:-DenseResidential Forest River}"
HTTP_PORT="${HTTP_PORT:-8780}"
KEEP="${KEEP:-}"
PIDS=()

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
die() { printf 'demo: %s\n' "$*" >&2; exit 1; }

cleanup() {
    local code=$?
    for (( i=${#PIDS[@]}-1; i>=0; i-- )); do
        kill -TERM "${PIDS[$i]}" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if (( code != 0 )); then
        echo "demo failed (exit $code); logs: $DEMO/daemon.log $DEMO/mosquitto.log" >&2
        [[ -f "$DEMO/daemon.log" ]] && tail -n 20 "$DEMO/daemon.log" >&2
    fi
    exit "$code"
}
trap cleanup EXIT INT TERM

[[ -x "$BIN/terratile" && -x "$BIN/terratile-export" ]] || die "run 'make venv' first"
MOSQUITTO="$(command -v mosquitto || echo /usr/sbin/mosquitto)"
[[ -x "$MOSQUITTO" ]] || die "mosquitto not installed (make system-deps)"
command -v mosquitto_sub >/dev/null || die "mosquitto_sub not installed (mosquitto-clients)"
mkdir -p "$DEMO"

# -- 1. training data -----------------------------------------------------------------
if [[ -n "$DATA" ]]; then
    TAG="aid-$(echo "$DEMO_CLASSES" | tr ' ' '-')"
    CHIPS="$DEMO/data-$TAG"
    say "training data: classes $DEMO_CLASSES from $DATA"
    rm -rf "$CHIPS" && mkdir -p "$CHIPS"
    for c in $DEMO_CLASSES; do
        [[ -d "$DATA/$c" ]] || die "$DATA/$c does not exist (set DEMO_CLASSES)"
        ln -s "$(cd "$DATA/$c" && pwd)" "$CHIPS/$c"   # read-only data is linked, not copied
    done
else
    TAG=synthetic
    CHIPS="$DEMO/data-$TAG"
    if [[ ! -f "$CHIPS/.complete" ]]; then
        say "training data: generating 3 textured classes (urban, vegetation, water)"
        rm -rf "$CHIPS"
        "$PY" demo/synthetic.py chips "$CHIPS"
        touch "$CHIPS/.complete"
    fi
fi

# -- 2. train + bundle (skipped when already done for this data) ------------------------
RUN="$DEMO/run-$TAG"
BUNDLE="$DEMO/bundle-$TAG"
if [[ ! -f "$RUN/metrics.json" ]]; then
    say "terratile-export train (efficientnet_lite0, 3 epochs, 64 px)"
    rm -rf "$RUN"
    "$BIN/terratile-export" train --data "$CHIPS" --backbone efficientnet_lite0 \
        --pretrained --epochs 3 --image-size 64 --batch-size 16 --out "$RUN"
fi
if [[ ! -f "$BUNDLE/manifest.json" ]]; then
    say "terratile-export bundle"
    rm -rf "$BUNDLE"
    "$BIN/terratile-export" bundle --run "$RUN" --out "$BUNDLE" --name "demo-$TAG" \
        --scales 32,64
fi

# -- 3. the scene to drop ---------------------------------------------------------------
if [[ -z "$SCENE" ]]; then
    SCENE="$DEMO/synthetic-scene.tif"
    if [[ ! -f "$SCENE" ]]; then
        say "generating a 512x512 GeoTIFF scene (EPSG:32633, 10 m pixels)"
        "$PY" demo/synthetic.py scene "$SCENE"
    fi
fi
[[ -f "$SCENE" ]] || die "SCENE=$SCENE does not exist"

# -- 4. broker on a free port -------------------------------------------------------------
PORT="$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
say "mosquitto on 127.0.0.1:$PORT"
{ cat configs/mosquitto.dev.conf; echo "listener $PORT 127.0.0.1"; } > "$DEMO/mosquitto.conf"
"$MOSQUITTO" -c "$DEMO/mosquitto.conf" > "$DEMO/mosquitto.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do
    "$PY" -c "import socket; socket.create_connection(('127.0.0.1', $PORT), 0.2)" 2>/dev/null && break
    sleep 0.1
done

# -- 5. the appliance -----------------------------------------------------------------------
rm -rf "$BOX" && mkdir -p "$BOX"
# the dashboard's token (the rollback button asks for it); readable by this user only
( umask 077 && "$PY" -c 'import secrets; print(secrets.token_urlsafe(24))' > "$DEMO/http-token" )
"$PY" -c "import socket; socket.create_server(('127.0.0.1', $HTTP_PORT)).close()" 2>/dev/null \
    || die "port $HTTP_PORT is taken: run with HTTP_PORT=<another port>"
cat > "$DEMO/appliance.yaml" <<EOF
node_id: $NODE
paths: {inbox: box/inbox, results: box/results, failed: box/failed, state: box/state}
model: {bundle: $BUNDLE, providers: [${DEMO_PROVIDERS:-cpu}]}
tiling: {batch_size: 64}  # scales: the bundle's (--scales at export)
input: {settle_seconds: 0.5, rescan_seconds: 2}
mqtt: {port: $PORT, stats_interval: 30}
http: {port: $HTTP_PORT, token_file: http-token}
EOF
"$BIN/terratile" config validate "$DEMO/appliance.yaml"

TOPIC="terratile/$NODE/scene/+"
mosquitto_sub -h 127.0.0.1 -p "$PORT" -V mqttv5 -q 1 -C 1 -W 300 \
    -t "$TOPIC/result" -t "$TOPIC/failed" -F '%t %p' > "$DEMO/result.txt" &
SUB=$!
PIDS+=("$SUB")

say "terratile run (log: .demo/daemon.log)"
"$BIN/terratile" run --config "$DEMO/appliance.yaml" > "$DEMO/daemon.log" 2>&1 &
DAEMON=$!
PIDS+=("$DAEMON")
for _ in $(seq 600); do
    grep -q "ready: watching" "$DEMO/daemon.log" && break
    kill -0 "$DAEMON" 2>/dev/null || die "the daemon exited during start-up"
    sleep 0.2
done
grep -q "ready: watching" "$DEMO/daemon.log" || die "the daemon did not become ready"

# -- 6. drop the scene the way producers should: write .part, then rename -----------------
NAME="$(basename "$SCENE")"
say "dropping $NAME into the inbox"
cp "$SCENE" "$BOX/inbox/$NAME.part"
mv "$BOX/inbox/$NAME.part" "$BOX/inbox/$NAME"

wait "$SUB" || die "no result on MQTT within 300 s"
read -r GOT_TOPIC GOT_JSON < "$DEMO/result.txt"
say "MQTT $GOT_TOPIC"
echo "$GOT_JSON" | "$PY" -m json.tool

say "terratile status"
"$BIN/terratile" status --config "$DEMO/appliance.yaml"
[[ "$GOT_TOPIC" == */result ]] || die "the scene failed (see the payload above)"
URL="http://127.0.0.1:$HTTP_PORT/"
say "dashboard: $URL"
echo "  the map, the scene list, drift, model versions; metrics at ${URL}metrics"
echo "  rollback token: $(cat "$DEMO/http-token")  (in .demo/http-token)"
echo "  outputs in .demo/box/results/"
if [[ -n "$KEEP" ]]; then
    echo "  kept up (KEEP=1): drop more GeoTIFFs into .demo/box/inbox/; Ctrl-C stops"
    trap 'printf "\nstopping\n"; exit 0' INT TERM   # a wanted stop, not a failure
    wait "$DAEMON" || true
else
    echo "  run 'make demo KEEP=1' to keep the dashboard up"
fi
