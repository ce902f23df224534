#!/bin/bash
# GPU check: ~350M SPLA LM at 16K context, same global batch (2 sequences) on
#   1 GPU  (trainer=gpu, batch 2)   and   2 GPUs (trainer=fsdp, batch 1 per GPU).
# Writes $OUT/{versions.txt,gpu1.log,fsdp2.log,gpu1/metrics.csv,fsdp2/metrics.csv}.
set -u
export PYTHONUNBUFFERED=1
STEPS=${STEPS:-40}; T=${T:-150}; ACC=${ACC:-gpu}
python3 -c "import lightning" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --no-compile \
  --target /tmp/site build/gpu/lightning-*.whl
python3 -c "import torch, lightning; print(torch.__version__, lightning.__version__, torch.cuda.device_count(),
  [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])" 2>&1 | tee $OUT/versions.txt
SIZE=${SIZE:-"data.seq_len=16384 model.d_model=1024 model.n_layers=32 model.n_heads=8 model.n_kv_heads=2 sparse.block_size=64 sparse.topk=16"}
COMMON="$SIZE trainer.max_steps=$STEPS optim.warmup_steps=10 trainer.limit_val_batches=0 trainer.val_check_interval=$STEPS
 trainer.log_every_n_steps=1 trainer.enable_progress_bar=false trainer.enable_model_summary=false data.num_workers=2
 ~callbacks.progress_bar ~callbacks.model_checkpoint ~logger.tensorboard
 +logger.csv._target_=lightning.pytorch.loggers.CSVLogger +logger.csv.save_dir=$OUT +logger.csv.version=''
 +logger.csv.flush_logs_every_n_steps=5 paths.log_dir=/tmp/spla_logs"
date -u +%FT%TZ | tee -a $OUT/versions.txt
timeout $T python3 train.py trainer=gpu trainer.accelerator=$ACC data.batch_size=2 \
  $COMMON +logger.csv.name=gpu1 > $OUT/gpu1.log 2>&1; echo "gpu1 rc=$?" | tee -a $OUT/versions.txt
timeout $T python3 train.py trainer=fsdp trainer.accelerator=$ACC trainer.devices=2 data.batch_size=1 \
  $COMMON +logger.csv.name=fsdp2 > $OUT/fsdp2.log 2>&1; echo "fsdp2 rc=$?" | tee -a $OUT/versions.txt
date -u +%FT%TZ | tee -a $OUT/versions.txt
tail -3 $OUT/gpu1.log $OUT/fsdp2.log
