#!/bin/bash
# Where the 2-GPU scaling goes (2x H200): the GPU link, the collectives' bandwidth, and short runs of the
# ~355M SPLA model at 16K context that change one thing at a time:
#   g1b2  1 GPU, batch 2         g1b1  1 GPU, batch 1 (what each FSDP rank computes)
#   f2    FSDP2, 2 GPUs, batch 1/GPU (bf16 params)    f2fp32  same, fp32 params (the 1-GPU run's numerics)
#   f2keep  FSDP2, reshard_after_forward=false        d2  DDP, 2 GPUs, batch 1/GPU
#   f2b2  FSDP2, batch 2/GPU (weak scaling: each rank computes what g1b2 does)
# g1b2 and g1b1 run at the same time, one per GPU. Writes $OUT/<arm>/metrics.csv, $OUT/<arm>.log, $OUT/*.txt.
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
STEPS=${STEPS:-25}; T=${T:-80}
SIZE="data.seq_len=16384 model.d_model=1024 model.n_layers=32 model.n_heads=8 model.n_kv_heads=2 sparse.block_size=64 sparse.topk=16"
COMMON="$SIZE trainer.max_steps=$STEPS optim.warmup_steps=10 trainer.limit_val_batches=0 trainer.val_check_interval=$STEPS
 trainer.log_every_n_steps=1 trainer.enable_progress_bar=false trainer.enable_model_summary=false data.num_workers=2
 ~callbacks.progress_bar ~callbacks.model_checkpoint ~logger.tensorboard
 +logger.csv._target_=lightning.pytorch.loggers.CSVLogger +logger.csv.save_dir=$OUT +logger.csv.version=''
 +logger.csv.flush_logs_every_n_steps=5 paths.log_dir=/tmp/spla_logs"
arm() {  # arm NAME TIMEOUT OVERRIDES...
  local name=$1 t=$2; shift 2
  timeout $t python3 train.py "$@" $COMMON +logger.csv.name=$name > $OUT/$name.log 2>&1
  echo "$name rc=$? $(date -u +%T)" | tee -a $OUT/runs.txt
}
{ date -u +%FT%TZ; nvidia-smi --query-gpu=name,driver_version,pcie.link.gen.current,pcie.link.width.current --format=csv
  nvidia-smi topo -m; nvidia-smi nvlink -s 2>&1 | head -20; } > $OUT/topo.txt 2>&1
python3 -c "import torch; print('p2p', torch.cuda.can_device_access_peer(0, 1))" >> $OUT/topo.txt 2>&1
CUDA_VISIBLE_DEVICES=0 arm g1b2 $T trainer=gpu data.batch_size=2 &
CUDA_VISIBLE_DEVICES=1 arm g1b1 $T trainer=gpu data.batch_size=1
wait
NCCL_DEBUG=INFO torchrun --nproc-per-node 2 benchmarks/collectives.py --mib 22 44 710 1420 \
  > $OUT/collectives.log 2>&1; echo "collectives rc=$?" | tee -a $OUT/runs.txt
grep -v "NCCL INFO" $OUT/collectives.log > $OUT/collectives.txt
grep -E "via|Channel 00|transport|P2P|SHM|NVLS" $OUT/collectives.log | sort | uniq | head -30 >> $OUT/collectives.txt
arm f2 $T trainer=fsdp trainer.devices=2 data.batch_size=1
arm f2fp32 $T trainer=fsdp trainer.devices=2 data.batch_size=1 trainer.strategy.param_dtype=fp32
arm d2 $T trainer=ddp trainer.devices=2 data.batch_size=1
arm f2b2 $T trainer=fsdp trainer.devices=2 data.batch_size=2
arm f2keep $T trainer=fsdp trainer.devices=2 data.batch_size=1 trainer.strategy.reshard_after_forward=false
python3 benchmarks/fsdp_h200x2/scaling_summary.py $OUT | tee $OUT/summary.txt
