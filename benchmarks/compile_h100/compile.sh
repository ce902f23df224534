#!/bin/bash
# torch.compile of the blocks on the GPU (H100): the ~355M SPLA LM at 16K context, batch 1, with and without
# trainer.compile=true; reports the graph breaks (CompileReport) and steady-state tokens/s.
set -u
export PYTHONUNBUFFERED=1
STEPS=${STEPS:-30}; RUNS=/tmp/runs; rm -rf $RUNS; mkdir -p $RUNS
SIZE="data.seq_len=16384 model.d_model=1024 model.n_layers=32 model.n_heads=8 model.n_kv_heads=2 sparse.block_size=64 sparse.topk=16"
COMMON="$SIZE trainer=gpu data.batch_size=1 trainer.max_steps=$STEPS optim.lr=1e-3 optim.warmup_steps=40
 trainer.limit_val_batches=0 trainer.val_check_interval=$STEPS trainer.log_every_n_steps=1
 trainer.enable_progress_bar=false trainer.enable_model_summary=false data.num_workers=2 ~callbacks.progress_bar
 ~callbacks.model_checkpoint ~logger.tensorboard +logger.csv._target_=lightning.pytorch.loggers.CSVLogger
 +logger.csv.save_dir=$RUNS +logger.csv.version='' +logger.csv.flush_logs_every_n_steps=10 paths.log_dir=/tmp/spla_logs"
ARMS=${ARMS:-eager compiled}
for arm in $ARMS; do
  flag=$([ $arm = compiled ] && echo true || echo false)
  start=$(date +%s)
  timeout ${T:-280} python3 train.py $COMMON trainer.compile=$flag +logger.csv.name=$arm > $RUNS/$arm.log 2>&1
  echo "$arm rc=$? wall $(( $(date +%s) - start )) s" | tee -a $RUNS/runs.txt
done
grep -A12 -i "graph break\|compiled without" $RUNS/compiled.log | head -40 > $RUNS/graph_breaks.txt
python3 benchmarks/fsdp_h200x2/scaling_summary.py $RUNS ${ARMS%% *} | tee $RUNS/summary.txt
cat $RUNS/runs.txt $RUNS/graph_breaks.txt; tail -5 $RUNS/compiled.log
tar czf $OUT/runs.tar.gz -C $RUNS .
