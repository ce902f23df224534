#!/bin/bash
# Stage B in one device session of an nvidia-h200-x2: the dense base's pretraining on GPU 0 beside the throughput
# probe on GPU 1, then the CPT launch of every arm x seed from that base on both GPUs, sized by `stage_b.py --size`
# for the time left. It is longer than one device call: run it as a daemon (benchmarks/study/device.sh):
#
#   bash benchmarks/study/device.sh start 555 bash benchmarks/study/stage_b_chain.sh   # carry .whl, data/stageb
#   bash benchmarks/study/device.sh watch 570                                          # issue each call at once
#   bash benchmarks/study/device.sh finish 200                                         # outputs -> $OUT
#
# then here: python scripts/collect_study.py <files_at>/pre_runs.tar.gz <files_at>/cpt_runs.tar.gz --name study_b
# --out results/study_b. Outputs in $STATE (device.sh's /tmp/study_out): pre_runs.tar.gz (the base's record),
# cpt_runs.tar.gz (the CPT runs' records), stage_b_base.tar.gz* (the base, for later use), tables.tar.gz (probe,
# size, tables, every launcher's log and commands), launcher.log (all of them interleaved).
#
# Environment: TOTAL seconds from the start to the end of the evaluation (default 1400: a 30-minute session less
# the machine's start, the calls' transfers and the collection); PRE_STEPS (default 1000: 10 passes over the stdlib
# corpus, the launcher's --pretrain-max-epochs; the best val/loss came at ~8 on 2026-11-30); DATA (data/stageb,
# prepared here with `stage_b.py --until data`); SEEDS (the CPT seeds, default "1 2 3 4 5"); EXTRA (more stage_b.py
# flags for every launch); CPU=1: a dry run on this machine (--tiny --device cpu, no GPU pinning).
set -u
T0=$(date +%s)
STATE=${STATE:-/tmp/study_out}; WORK=${WORK:-/tmp/sbw}
TOTAL=${TOTAL:-1400}; PRE_STEPS=${PRE_STEPS:-1000}; PRE_S=${PRE_S:-400}; DATA=${DATA:-data/stageb}
EXTRA=${EXTRA:-}; SEEDS=${SEEDS:-1 2 3 4 5}
if [ -n "${CPU:-}" ]; then
  EXTRA="$EXTRA --tiny --device cpu"; G0=""; G1=""; GALL=""
else
  G0="--gpus 0"; G1="--gpus 1"; GALL="--gpus 0,1"
fi
SB="python3 benchmarks/study/stage_b.py"
mkdir -p "$STATE" "$WORK"
log() { echo "[chain $(date -u +%T)] $*" >> "$STATE/launcher.log"; }

log "pretraining $PRE_STEPS steps on GPU 0 | probe on GPU 1; $TOTAL s in all"
# shellcheck disable=SC2086  # the flag strings are meant to split
$SB --until pretrain $G0 --data "$DATA" --val-every 100 --pretrain-steps "$PRE_STEPS" --pretrain-s "$PRE_S" \
  --num-samples 20 --eval-s 150 --workdir "$WORK/pre" --out "$STATE/pre" $EXTRA >> "$STATE/launcher.log" 2>&1 &
PRE=$!
# the probe runs two seeds at once on one GPU: about the study's processes per GPU (15 runs on two)
# shellcheck disable=SC2086
$SB --probe $G1 --data "$DATA" --seeds 1 2 --pretrain-s 120 --cpt-s 200 --eval-s 200 --workdir "$WORK/probe" \
  --out "$STATE/probe" $EXTRA >> "$STATE/launcher.log" 2>&1
log "probe rc=$?"
wait $PRE
log "pretraining rc=$?"
if ! ls "$STATE"/pre/stage_b_base.tar.gz* > /dev/null 2>&1; then
  log "no base archive: see pre/launcher.log; stopping"; exit 1
fi
rm -rf models/stage_b_base && mkdir -p models && cat "$STATE"/pre/stage_b_base.tar.gz* | tar xz -C models

budget=$(( TOTAL - ($(date +%s) - T0) ))
# shellcheck disable=SC2086
$SB --size "$STATE/probe/probe.json" --budget-s "$budget" --seeds $SEEDS $GALL $EXTRA > "$STATE/size.env" 2>> "$STATE/launcher.log" \
  || { log "--size failed; stopping"; exit 1; }
cat "$STATE/size.env" >> "$STATE/launcher.log"
. "$STATE/size.env"
# the step count (capped at --cpt-max-epochs passes) fixes the work; the probe's rate came from fewer runs at once,
# so the training deadline gets all the time the evaluation does not need (a safety net, not a size)
[ $(( budget - EVAL_S - 60 )) -gt "$CPT_S" ] && CPT_S=$(( budget - EVAL_S - 60 ))
log "CPT: --cpt-steps $CPT_STEPS --cpt-s $CPT_S --eval-s $EVAL_S --num-samples $NSAMP (budget ${budget}s)"
# shellcheck disable=SC2086
$SB --base models/stage_b_base --seeds $SEEDS $GALL --data "$DATA" --val-every 50 --cpt-steps "$CPT_STEPS" --cpt-s "$CPT_S" \
  --eval-s "$EVAL_S" --num-samples "$NSAMP" --workdir "$WORK/cpt" --out "$STATE/cpt" $EXTRA \
  >> "$STATE/launcher.log" 2>&1
log "CPT launch rc=$?"

cd "$STATE" || exit 1
cp pre/study_b_runs.tar.gz pre_runs.tar.gz; cp cpt/study_b_runs.tar.gz cpt_runs.tar.gz; cp pre/stage_b_base.tar.gz* .
tar czf tables.tar.gz size.env probe/probe.md probe/probe.json probe/launcher.log probe/commands.sh \
  pre/launcher.log pre/commands.sh pre/study_b.md cpt/launcher.log cpt/commands.sh cpt/study_b.md cpt/study_b.json \
  cpt/study_b.png 2> /dev/null
log "done in $(( $(date +%s) - T0 ))s"
