"""Compose the project's Hydra configs in tests, with tiny sizes."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

TINY = [
    "data.seq_len=128", "data.batch_size=2", "data.vocab_size=128", "data.val_samples=4",
    "model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
    "sparse.block_size=16", "sparse.topk=3",
    "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
    "~callbacks.progress_bar", "optim.warmup_steps=2",
]


def make_cfg(overrides: list[str] = (), output_dir: Path | None = None, tiny: bool = True,
             config_name: str = "train") -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` as ``python train.py <overrides>`` would, outputs in ``output_dir``."""
    overrides = (TINY if tiny else []) + list(overrides)
    if {"sparse=window", "+variant=window"} & set(overrides):  # a window has no topk (sparse/window.yaml): drop it
        overrides = [o for o in overrides if not o.startswith("sparse.topk=")]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
    return cfg
