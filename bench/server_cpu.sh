#!/usr/bin/env bash
# bench/server_cpu.sh KIND CONC: one perf_analyzer point (server on core 0, client on core 1) and the
# server's CPU per request, in all and for its busiest threads (from /proc), with context switches.
#   KIND: null | ort (../shared/bench v2_server.py --mode null/ort: no model / the shipped model per request)
#         | new (this tree) | base (/tmp/ab-base, see ab_perf.sh)
#         | xs:STEP (bench/price_steps.py STEP: const1, const, dec, decort, full)
#   ROWS (default 1), PA (extra perf_analyzer arguments, e.g. --streaming), XARGS (extra xorserve flags)
cd "$(dirname "$0")/.."
ROOT=$PWD
SHARED=$(cd "$ROOT/../shared/bench" && pwd)
PY=$ROOT/.venv/bin/python
P=18194
if [ $1 = null ] || [ $1 = ort ]; then
  taskset -c 0 /tmp/venv-bench/bin/python $SHARED/v2_server.py --mode $1 --port $P --model $ROOT/models/xor/1/model.onnx > ${TMPDIR:-/tmp}/server-cpu-srv.log 2>&1 &
  pid=$!; until /tmp/venv-bench/bin/python $SHARED/probe.py --port $P --timeout 1 >/dev/null 2>&1; do sleep 0.2; done
elif [[ $1 == xs:* ]]; then
  (exec taskset -c 0 $PY bench/price_steps.py ${1#xs:} --model-repository $ROOT/models --port $P --metrics-port 0 --max-batch-size 1024 ${XARGS:-}) > ${TMPDIR:-/tmp}/server-cpu-srv.log 2>&1 &
  pid=$!; until grep -q READY ${TMPDIR:-/tmp}/server-cpu-srv.log; do sleep 0.1; done
else
  src=$ROOT; [ $1 = base ] && src=/tmp/ab-base
  (cd $src && PYTHONPATH=$src exec taskset -c 0 $PY -m serving.cli serve --model-repository $ROOT/models --port $P --metrics-port 0 --max-batch-size 1024 ${XARGS:-}) > ${TMPDIR:-/tmp}/server-cpu-srv.log 2>&1 &
  pid=$!; until grep -q READY ${TMPDIR:-/tmp}/server-cpu-srv.log; do sleep 0.1; done
fi
snap() { # utime+stime ticks, vol, nonvol ctx over all threads
  local u=0 v=0 n=0
  for t in /proc/$pid/task/*; do
    read -r -a g < $t/stat; echo "T ${t##*/}:$(cat $t/comm) $((g[13]+g[14])) $(awk '/^voluntary/{print $2}' $t/status) $(awk '/^nonvoluntary/{print $2}' $t/status)" >&2
    read -r -a f < $t/stat; u=$((u + f[13] + f[14]))
    v=$((v + $(awk '/^voluntary/{print $2}' $t/status))); n=$((n + $(awk '/^nonvoluntary/{print $2}' $t/status)))
  done; echo $u $v $n; }
( sleep 2.5; snap > ${TMPDIR:-/tmp}/server-cpu-a 2>${TMPDIR:-/tmp}/server-cpu-ta; sleep 3; snap > ${TMPDIR:-/tmp}/server-cpu-b 2>${TMPDIR:-/tmp}/server-cpu-tb; ls /proc/$pid/task | wc -l > ${TMPDIR:-/tmp}/server-cpu-n ) &
out=$(CLIENT_CPUS=1 MEASURE_MS=2000 BENCH_RUN_DIR=${BENCH_RUN_DIR:-/tmp/ab-perf-run} PA_EXTRA=${PA:-} $SHARED/run_perf.sh $P $2 ${ROWS:-1})
wait %2 2>/dev/null; sleep 0.1
rate=$(echo $out | cut -d, -f4)
read ua va na < ${TMPDIR:-/tmp}/server-cpu-a; read ub vb nb < ${TMPDIR:-/tmp}/server-cpu-b
awk -v k=$1 -v r=$rate -v u=$((ub-ua)) -v v=$((vb-va)) -v n=$((nb-na)) -v th=$(cat ${TMPDIR:-/tmp}/server-cpu-n) 'BEGIN{req=r*3; printf "%s rate=%.0f cpu_util=%.2f cpu_us/req=%.0f volctx/req=%.2f involctx/req=%.2f threads=%d\n", k, r, u/100/3, u*10000/req, v/req, n/req, th}'
python3 -c '
import sys
r=float(sys.argv[1])*3
a={l.split()[1]:list(map(int,l.split()[2:])) for l in open(sys.argv[2])}
b={l.split()[1]:list(map(int,l.split()[2:])) for l in open(sys.argv[3])}
rows=[(k,[(y-x)/r for x,y in zip(a[k],b[k])]) for k in b if k in a]
for k,(c,v,n) in sorted(rows,key=lambda x:-x[1][0])[:6]: print("   %-24s cpu_us/req=%5.1f vol/req=%.2f invol/req=%.2f"%(k,c*10000,v,n))
' $rate ${TMPDIR:-/tmp}/server-cpu-ta ${TMPDIR:-/tmp}/server-cpu-tb
kill -TERM $pid; wait $pid
