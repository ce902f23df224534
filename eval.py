"""Long-context evaluation of a trained checkpoint: RULER-style suite, perplexity by position, selection fidelity.

    python eval.py ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt
    python eval.py ckpt_path=<run dir> lengths=[512,1024] num_samples=20 tasks=[niah_single,variable_tracking]
    python eval.py ckpt_path=... device=cuda impl=triton lengths=[4096,16384,65536]
    python eval.py ckpt_path=... override.sparse.topk=8      # evaluate with another topk (weights unchanged)
    python eval.py ckpt_path=... decode=generate             # also score by greedy generation (KV cache)

Writes results.json, results.md and accuracy.png to output_dir; see conf/eval.yaml for every option.
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from spla_lit.eval.runner import evaluate
from spla_lit.training.run import exit_on_config_error

log = logging.getLogger("eval")


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> float | None:
    with exit_on_config_error(cfg, log):
        results = evaluate(cfg)
    # the value a Hydra sweeper would optimise: RULER's score averaged over lengths
    return results["ruler"]["overall"]


if __name__ == "__main__":
    main()
