#!/usr/bin/env bash
# A/B throughput of server variants in one run: each server pinned to core 0, perf_analyzer to core 1.
#
#   bench/ab_perf.sh "VARIANTS" "CONCURRENCIES" [ROWS] [ROUNDS]
#   e.g. bench/ab_perf.sh "null base new new:stream" "1 16 64" 1 2
#
# Variants (measured one after the other, in the given order, ROUNDS times over):
#   null          ../shared/bench/null (v2_server.py --mode null), the Python gRPC ceiling
#   new[:OPTS]    xorserve from this working tree
#   base[:OPTS]   xorserve from $BASE_DIR (default /tmp/ab-base: `git archive HEAD serving` unpacked
#                 there when missing; set BASE_REF to snapshot another commit)
#   OPTS (comma-separated): stream (perf_analyzer --streaming), off (--no-batching), mbs=N
#                 (--max-batch-size N instead of 1024)
# Prints `variant,round,concurrency,rows,infer_per_s,p50_us,p90_us,p99_us` lines (run_perf.sh's
# columns). MEASURE_MS (default 1500) is perf_analyzer's window, 3 windows per point.
# XARGS: extra xorserve flags for new and base (e.g. "--max-batch-size 4096").
# Needs ../shared/bench/setup.sh (perf_analyzer, /tmp/venv-bench).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SHARED=$(cd "$ROOT/../shared/bench" && pwd)
VARIANTS=${1:?usage: $0 "VARIANTS" "CONCURRENCIES" [ROWS] [ROUNDS]}
CONCS=${2:-"1 16 64"}
ROWS=${3:-1}
ROUNDS=${4:-1}
PORT=${PORT:-18190}
BASE_DIR=${BASE_DIR:-/tmp/ab-base}
BASE_REF=${BASE_REF:-HEAD}
export BENCH_RUN_DIR=${BENCH_RUN_DIR:-/tmp/ab-perf-run}   # our own pid files, apart from other users of null/
export MODEL_ONNX=$ROOT/models/xor/1/model.onnx
export MEASURE_MS=${MEASURE_MS:-1500}
mkdir -p "$BENCH_RUN_DIR"
if [ ! -d "$BASE_DIR/serving" ]; then
  mkdir -p "$BASE_DIR" && git -C "$ROOT" archive "$BASE_REF" serving | tar -x -C "$BASE_DIR"
fi

server_pid=
start_xorserve() {  # start_xorserve SRC_DIR EXTRA_ARGS...
  local src=$1; shift
  local log="$BENCH_RUN_DIR/xorserve.log"
  # From SRC itself: `python -m` puts the working directory first on sys.path, ahead of PYTHONPATH.
  (cd "$src" && PYTHONPATH=$src exec taskset -c 0 "$ROOT/.venv/bin/python" -m serving.cli serve \
     --model-repository "$ROOT/models" --port "$PORT" --metrics-port 0 --max-batch-size 1024 ${XARGS:-} "$@") \
     >"$log" 2>&1 &
  server_pid=$!
  for _ in $(seq 600); do
    grep -q '^READY' "$log" && return 0
    kill -0 "$server_pid" 2>/dev/null || { echo "xorserve died: $(tail -3 "$log")" >&2; return 1; }
    sleep 0.1
  done
  echo "xorserve not ready" >&2; return 1
}

for round in $(seq "$ROUNDS"); do
  for variant in $VARIANTS; do
    name=${variant%%:*}; opts=,${variant#*:},; [ "$variant" = "$name" ] && opts=,
    extra=(); pa=
    case $opts in *,off,*) extra+=(--no-batching) ;; esac
    case $opts in *,stream,*) pa=--streaming ;; esac
    case $opts in *,mbs=*) extra+=(--max-batch-size "$(echo "$opts" | sed 's/.*,mbs=\([0-9]*\),.*/\1/')") ;; esac
    case $name in
      null) SERVER_CPUS=0 "$SHARED/null/start.sh" "$PORT" 2>/dev/null || exit 1 ;;
      new) start_xorserve "$ROOT" "${extra[@]}" || exit 1 ;;
      base) start_xorserve "$BASE_DIR" "${extra[@]}" || exit 1 ;;
      *) echo "unknown variant $variant" >&2; exit 2 ;;
    esac
    CLIENT_CPUS=1 PEER=x PA_EXTRA=$pa "$SHARED/run_perf.sh" "$PORT" "$CONCS" "$ROWS" \
      | sed "s/^x,/$variant,$round,/"
    if [ "$name" = null ]; then "$SHARED/null/stop.sh" 2>/dev/null
    else kill -TERM "$server_pid"; wait "$server_pid"; fi
  done
done
