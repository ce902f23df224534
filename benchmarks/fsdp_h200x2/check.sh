#!/bin/bash
# The 2-GPU check of issue 5 (2x H200): ~355M SPLA LM at 16K context, global batch 2 sequences, STEPS steps.
#   gpu1, gpu1b  1 GPU x batch 2, twice, at the same time (one per GPU): the run-to-run noise band of the
#                1-GPU reference, and its tokens/s
#   fsdp2        trainer=fsdp, 2 GPUs x batch 1 (default: fp32 parameters gathered, bf16 autocast)
#   fsdp2_bf16   the same with trainer.strategy.param_dtype=bf16
# Writes $OUT/summary.txt and $OUT/runs.tar.gz (logs, per-step metrics.csv of every run).
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
STEPS=${STEPS:-200}; LR=${LR:-1e-3}; WARMUP=${WARMUP:-40}; T1=${T1:-230}; T2=${T2:-170}
RUNS=/tmp/runs; rm -rf $RUNS; mkdir -p $RUNS
SIZE="data.seq_len=16384 model.d_model=1024 model.n_layers=32 model.n_heads=8 model.n_kv_heads=2 sparse.block_size=64 sparse.topk=16"
COMMON="$SIZE trainer.max_steps=$STEPS optim.lr=$LR optim.warmup_steps=$WARMUP trainer.limit_val_batches=0
 trainer.val_check_interval=$STEPS trainer.log_every_n_steps=1 trainer.enable_progress_bar=false
 trainer.enable_model_summary=false data.num_workers=2 ~callbacks.progress_bar ~callbacks.model_checkpoint
 ~logger.tensorboard +logger.csv._target_=lightning.pytorch.loggers.CSVLogger +logger.csv.save_dir=$RUNS
 +logger.csv.version='' +logger.csv.flush_logs_every_n_steps=10 paths.log_dir=/tmp/spla_logs"
arm() {  # arm NAME TIMEOUT OVERRIDES...
  local name=$1 t=$2; shift 2
  timeout $t python3 train.py "$@" $COMMON +logger.csv.name=$name > $RUNS/$name.log 2>&1
  echo "$name rc=$? $(date -u +%T)" | tee -a $RUNS/runs.txt
}
{ date -u +%FT%TZ; python3 -c "import torch, lightning; print(torch.__version__, lightning.__version__)"; } \
  | tee $RUNS/runs.txt
CUDA_VISIBLE_DEVICES=0 arm gpu1 $T1 trainer=gpu data.batch_size=2 &
CUDA_VISIBLE_DEVICES=1 arm gpu1b $T1 trainer=gpu data.batch_size=2
wait
arm fsdp2 $T2 trainer=fsdp trainer.devices=2 data.batch_size=1
arm fsdp2_bf16 $T2 trainer=fsdp trainer.devices=2 data.batch_size=1 trainer.strategy.param_dtype=bf16
python3 benchmarks/fsdp_h200x2/summary.py $RUNS gpu1 gpu1b fsdp2 fsdp2_bf16 > $OUT/summary.txt 2>&1
cat $RUNS/runs.txt >> $OUT/summary.txt
tar czf $OUT/runs.tar.gz -C $RUNS .
cat $OUT/summary.txt
