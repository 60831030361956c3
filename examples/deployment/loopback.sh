#!/usr/bin/env bash
# The whole deployment on one machine, over loopback: a central server and three hospitals,
# each its own process, TLS and SuperNode authentication on, then a 2-round training run.
# Usage: examples/deployment/loopback.sh OUT_DIR   (the run directory ends up at OUT_DIR/run/)
set -euo pipefail
OUT=${1:?usage: loopback.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
HERE=$(cd "$(dirname "$0")/../.." && pwd)
cd "$HERE"
export FLWR_TELEMETRY_ENABLED=0
PORT=${PORT:-18500}
PIDS=()
stop_all() {
  for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  done
}
trap stop_all EXIT

medfed-server init --workspace "$OUT/server" --host 127.0.0.1 --port "$PORT"
setsid medfed-server start --workspace "$OUT/server" > "$OUT/superlink.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 60); do grep -q "Uvicorn running" "$OUT/superlink.log" && break; sleep 1; done

for i in 1 2 3; do
  medfed-site synth --out "$OUT/export-$i" --patients 40 --site-index $((i - 1)) --seed "$i"
  medfed-site init --workspace "$OUT/hospital-$i" --server "127.0.0.1:$PORT" --ca "$OUT/server/ca/ca.pem" \
    --data "$OUT/export-$i" --name "hospital-$i" > /dev/null
  medfed-server enroll --workspace "$OUT/server" "$OUT/hospital-$i/keys/node.pub" --name "hospital-$i"
  setsid medfed-site start --workspace "$OUT/hospital-$i" --runtime-port $((PORT + 10 + i)) > "$OUT/hospital-$i.log" 2>&1 &
  PIDS+=($!)
done
# the consortium hands every site the roster fingerprint out of band; each site pins it
FP=$(medfed-server roster --workspace "$OUT/server" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["sha256"])')
for i in 1 2 3; do medfed-site roster --workspace "$OUT/hospital-$i" --expect "$FP"; done
for _ in $(seq 1 90); do
  [ "$(medfed-server sites --workspace "$OUT/server" --json | grep -o '"online"' | wc -l)" -ge 3 ] && break; sleep 2
done
medfed-server sites --workspace "$OUT/server"
medfed-server run --workspace "$OUT/server" --rounds 2 --local-steps 10 --batch-size 16 --out "$OUT/run"
medfed-audit verify "$OUT/run" "$OUT/hospital-1" "$OUT/hospital-2" "$OUT/hospital-3"
echo "run directory: $OUT/run"
