"""Continue prompts with a trained checkpoint: prefill, then decode with the KV cache.

    python generate.py ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt prompt_ids=[1,17,42,9]
    python generate.py ckpt_path=<run dir> prompt_ids=[[1,17,42],[1,5]] max_new_tokens=64
    python generate.py ckpt_path=<run dir> prompt="def main(" tokenizer=data/tokenizer temperature=0.8 top_p=0.9

Prints each continuation and the tokens/s, writes generation.json to output_dir; see conf/generate.yaml.
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from spla_lit.inference.cli import run
from spla_lit.training.run import exit_on_config_error

log = logging.getLogger("generate")


@hydra.main(version_base="1.3", config_path="conf", config_name="generate")
def main(cfg: DictConfig) -> None:
    with exit_on_config_error(cfg, log):
        run(cfg)


if __name__ == "__main__":
    main()
