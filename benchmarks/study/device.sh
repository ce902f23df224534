#!/bin/bash
# A launch longer than one device call (10 minutes): start it as a daemon that outlives the call, watch it from
# the next calls, collect its outputs in the last. The machine stays warm only ~30 s between calls, so issue the
# next call at once; device time counts while the machine is held, so this costs no more than one long call.
#
#   bash benchmarks/study/device.sh start 555 python3 benchmarks/study/stage_a.py --steps 6000 --out /tmp/study_out \
#        --train-s 1450 --startup-s 50 --eval-s 150        # call 1: install, start, watch for 555 s
#   bash benchmarks/study/device.sh watch 570              # calls 2..n-1: progress every ~90 s
#   bash benchmarks/study/device.sh finish 200             # last call: wait for the end, copy outputs to $OUT
#
# The launch writes to /tmp/study_out (its --out); DONE there holds its exit code. Progress: the launcher's log
# tail and, per stage A run, the last logged step and validation accuracies (TensorBoard events).
set -u
STATE=/tmp/study_out
export PYTHONPATH=/tmp/site:$PWD:$PWD/kernels PYTHONUNBUFFERED=1

progress() {
  date -u +%T; uptime; nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv
  tail -n 30 $STATE/launcher.log 2>/dev/null
  python3 - <<'EOF'
from pathlib import Path
from spla_lit.eval.sweep import read_scalars
roots = sorted(Path("/tmp/spla_study").glob("study_a_*"))
for d in sorted(p for p in (roots[-1].iterdir() if roots else []) if p.is_dir()):
    s = read_scalars(d)
    last = {k: f"{v[-1][2]:.2f}@{v[-1][0]}" for k, v in s.items() if v}
    step = max((v[-1][0] for v in s.values() if v), default=0)
    print(f"{d.name:16s} step {step:5d}", *(f"{k.split('/')[-1]} {last.get(k, '-')}" for k in
          ("val/acc/niah_single", "val/acc/mqar", "val/answer_acc", "val/loss")))
EOF
}

watch() {  # watch LIMIT_S
  local end=$(( $(date +%s) + $1 )) n=0
  while [ "$(date +%s)" -lt $end ] && [ ! -f $STATE/DONE ]; do
    sleep 10; n=$((n + 1))
    [ $((n % 9)) -eq 0 ] && { date -u +%T; tail -n 2 $STATE/launcher.log 2>/dev/null; }
  done
  [ -f $STATE/DONE ] && echo "launch finished: $(cat $STATE/DONE)"
  progress
}

case "${1:-}" in
  start)
    limit=$2; shift 2
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl || exit 1
    mkdir -p $STATE
    nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv
    printf '%q ' "$@" > $STATE/command.sh
    setsid nohup bash -c "$(cat $STATE/command.sh) > $STATE/driver.log 2>&1; echo rc=\$? > $STATE/DONE" \
      > /dev/null 2>&1 < /dev/null &
    sleep 5; watch "$limit" ;;
  watch) watch "$2" ;;
  finish)
    watch "$2"
    cp $STATE/*.tar.gz $STATE/*.log $STATE/*.sh $STATE/*.md $STATE/*.json $STATE/*.png "$OUT"/ 2>/dev/null
    ls -la "$OUT" ;;
  *) echo "usage: device.sh start LIMIT_S COMMAND... | watch LIMIT_S | finish LIMIT_S" >&2; exit 2 ;;
esac
