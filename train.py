"""Train a language model with SPLA (or a baseline) attention.

    python train.py                                  # tiny SPLA LM on the embedded data, on the CPU
    python train.py model=spla scorer=taylor2        # choose components by config group
    python train.py -m scorer=taylor2,taylor1,random rla=subtract,none   # an ablation sweep
    python train.py trainer=gpu data.seq_len=4096 trainer.max_steps=2000
    python train.py ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt   # resume exactly (in a new run folder)

Ctrl-C or SIGTERM finishes the optimizer step, writes checkpoints/last.ckpt and exits with 128 + the signal.
See conf/ for every option; `python train.py --help` lists the config groups.
"""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from spla_lit.training import NonFiniteLossError, TrainingInterrupted
from spla_lit.training.run import exit_on_config_error, train

log = logging.getLogger("train")


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        with exit_on_config_error(cfg, log):
            metrics = train(cfg)
    except NonFiniteLossError as e:
        log.error("%s", e)
        sys.exit(1)
    except TrainingInterrupted as e:  # stopped on a signal, checkpoint written (logged by train)
        sys.exit(128 + e.signum)
    # the value a Hydra sweeper would optimise
    return metrics.get("val/loss")


if __name__ == "__main__":
    main()
