"""Continue prompts with a trained checkpoint: prefill, then decode with the KV cache.

    python generate.py ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt prompt_ids=[1,17,42,9]
    python generate.py ckpt_path=<run dir> prompt_ids=[[1,17,42],[1,5]] max_new_tokens=64
    python generate.py ckpt_path=<run dir> prompt="def main(" tokenizer=data/tokenizer temperature=0.8 top_p=0.9

Prints each continuation and the tokens/s, writes generation.json to output_dir; see conf/generate.yaml.
"""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from spla_lit.config import ConfigError
from spla_lit.inference.cli import run

log = logging.getLogger("generate")


@hydra.main(version_base="1.3", config_path="conf", config_name="generate")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except ConfigError as e:
        log.error("invalid config: %s", e)
        sys.exit(2)


if __name__ == "__main__":
    main()
