#!/bin/bash
# Run-to-run noise of the 1-GPU reference of the FSDP check: the same 1-GPU run twice (same seed, same data).
set -u
export PYTHONUNBUFFERED=1
STEPS=${STEPS:-30}; T=${T:-150}
SIZE="data.seq_len=16384 model.d_model=1024 model.n_layers=32 model.n_heads=8 model.n_kv_heads=2 sparse.block_size=64 sparse.topk=16"
COMMON="$SIZE trainer.max_steps=$STEPS optim.warmup_steps=10 trainer.limit_val_batches=0 trainer.val_check_interval=$STEPS
 trainer.log_every_n_steps=1 trainer.enable_progress_bar=false trainer.enable_model_summary=false data.num_workers=2
 ~callbacks.progress_bar ~callbacks.model_checkpoint ~logger.tensorboard
 +logger.csv._target_=lightning.pytorch.loggers.CSVLogger +logger.csv.save_dir=$OUT +logger.csv.version=''
 +logger.csv.flush_logs_every_n_steps=5 paths.log_dir=/tmp/spla_logs"
for run in gpu1 gpu1b; do
  timeout $T python3 train.py trainer=gpu data.batch_size=2 $COMMON +logger.csv.name=$run > $OUT/$run.log 2>&1
  echo "$run rc=$?"; tail -2 $OUT/$run.log
done
python3 - <<'PY'
import csv, os
def read(p):
    d = {}
    for r in csv.DictReader(open(p)):
        if r.get("train/loss"):
            d[int(r["step"])] = float(r["train/loss"])
    return d
out = os.environ["OUT"]
a, b = read(f"{out}/gpu1/metrics.csv"), read(f"{out}/gpu1b/metrics.csv")
for s in sorted(set(a) & set(b)):
    print(f"{s:3d} {a[s]:.4f} {b[s]:.4f} {b[s]-a[s]:+.4f}")
PY
