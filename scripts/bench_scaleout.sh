#!/usr/bin/env bash
# Scale-out benchmark in one run: the same 2 expert workers behind 1 and behind 2 gateways, on
# one Ray node and on two (`expertmesh cluster --nodes 2`, both on this machine, on loopback).
# Each configuration gets a fresh server; the same client (`expertmesh bench serve`, streaming
# completions, ignore_eos) runs every level; then one table per run and one plot of all four.
#
#   [MODEL=DIR] bash scripts/bench_scaleout.sh [OUT_DIR] [bench serve flags...]
#   MODEL=/tmp/medium bash scripts/bench_scaleout.sh docs/bench/scaleout --concurrency 32 128
# (MODEL: a checkpoint; default: the built-in tiny model)
set -euo pipefail
OUT=${1:-scaleout}
shift || true
FLAGS=("$@")
[ ${#FLAGS[@]} -gt 0 ] || FLAGS=(--concurrency 32 128 --requests 2 --max-tokens 32)
mkdir -p "$OUT"
COMMON=(--endpoint completions --prompt-tokens 32 "${FLAGS[@]}")
SERVE_MODEL=()
[ -z "${MODEL:-}" ] || SERVE_MODEL=(--model "$MODEL")

for g in 1 2; do
  expertmesh bench serve --workers 2 --gateways "$g" "${SERVE_MODEL[@]}" "${COMMON[@]}" \
    --label "1 node, $g gateway(s)" --out "$OUT/one-node-$g.json"
done

# two nodes: the server joins them (SPREAD puts one worker on each), the clients run here
for g in 1 2; do
  expertmesh cluster --nodes 2 -- bash -c '
    set -euo pipefail
    port=$(python -c "import socket; s=socket.socket(); s.bind((\"127.0.0.1\", 0)); print(s.getsockname()[1])")
    expertmesh serve --address auto --strategy SPREAD --workers 2 --gateways "$0" --port "$port" \
      ${MODEL:+--model "$MODEL"} > "$1/serve-two-nodes-$0.log" 2>&1 &
    pid=$!
    trap "kill -TERM $pid 2>/dev/null; wait $pid || true" EXIT
    until grep -q serving "$1/serve-two-nodes-$0.log"; do
      kill -0 $pid 2>/dev/null || { tail -50 "$1/serve-two-nodes-$0.log"; exit 1; }
      sleep 1
    done
    shift 1  # $0 is the gateway count, $1 the output folder
    expertmesh bench serve --url "http://127.0.0.1:$port" "$@"
  ' "$g" "$OUT" "${COMMON[@]}" --label "2 nodes, $g gateway(s)" --out "$OUT/two-nodes-$g.json"
done

expertmesh bench serve --compare "$OUT"/one-node-1.json "$OUT"/one-node-2.json \
  "$OUT"/two-nodes-1.json "$OUT"/two-nodes-2.json --plot "$OUT/scaleout.png"
