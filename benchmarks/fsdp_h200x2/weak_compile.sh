#!/bin/bash
# 2x H200, short runs of the ~355M SPLA LM at 16K context (after the host-sync removal):
#   g1b2     1 GPU, batch 2                 f2b2   FSDP2, 2 GPUs x batch 2 (weak scaling against g1b2)
#   g1b1c    1 GPU, batch 1, trainer.compile=true (run beside g1b2, on the other GPU)
#   f2c      FSDP2, 2 GPUs x batch 1, trainer.compile=true (compile composed with fully_shard)
# Writes $OUT/summary.txt and $OUT/runs.tar.gz.
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
STEPS=${STEPS:-25}; RUNS=/tmp/runs; rm -rf $RUNS; mkdir -p $RUNS
SIZE="data.seq_len=16384 model.d_model=1024 model.n_layers=32 model.n_heads=8 model.n_kv_heads=2 sparse.block_size=64 sparse.topk=16"
COMMON="$SIZE trainer.max_steps=$STEPS optim.lr=1e-3 optim.warmup_steps=40 trainer.limit_val_batches=0
 trainer.val_check_interval=$STEPS trainer.log_every_n_steps=1 trainer.enable_progress_bar=false
 trainer.enable_model_summary=false data.num_workers=2 ~callbacks.progress_bar ~callbacks.model_checkpoint
 ~logger.tensorboard +logger.csv._target_=lightning.pytorch.loggers.CSVLogger +logger.csv.save_dir=$RUNS
 +logger.csv.version='' +logger.csv.flush_logs_every_n_steps=5 paths.log_dir=/tmp/spla_logs"
arm() {  # arm NAME TIMEOUT OVERRIDES...
  local name=$1 t=$2; shift 2
  timeout $t python3 train.py "$@" $COMMON +logger.csv.name=$name > $RUNS/$name.log 2>&1
  echo "$name rc=$? $(date -u +%T)" | tee -a $RUNS/runs.txt
}
date -u +%FT%TZ | tee $RUNS/runs.txt
CUDA_VISIBLE_DEVICES=0 arm g1b2 ${T1:-100} trainer=gpu data.batch_size=2 &
CUDA_VISIBLE_DEVICES=1 arm g1b1c ${T1:-100} trainer=gpu data.batch_size=1 trainer.compile=true
wait
arm f2b2 ${T2:-85} trainer=fsdp trainer.devices=2 data.batch_size=2
arm f2c ${T3:-100} trainer=fsdp trainer.devices=2 data.batch_size=1 trainer.compile=true
grep -h "graph breaks\|compiled without" $RUNS/g1b1c.log $RUNS/f2c.log | head -4 > $RUNS/graph_breaks.txt
python3 benchmarks/fsdp_h200x2/scaling_summary.py $RUNS g1b2 > $OUT/summary.txt 2>&1
cat $RUNS/runs.txt $RUNS/graph_breaks.txt >> $OUT/summary.txt
tar czf $OUT/runs.tar.gz -C $RUNS .
cat $OUT/summary.txt
