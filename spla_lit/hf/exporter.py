"""``python -m spla_lit.export ckpt_path=<checkpoint or run dir> out=<dir>``: a training checkpoint as a Hugging Face
model folder.

* ``model=dense`` exports to the native format of a family (``family=llama|mistral|qwen2``; default: the family
  of the ``init_from`` checkpoint, else qwen2 when the model has q/k/v biases, else llama), which loads with plain
  ``AutoModelForCausalLM.from_pretrained(out)``.
* Any other attention (SPLA, linear) exports with its modeling code: ``configuration_spla.py`` and
  ``modeling_spla.py`` are written beside the weights and load with ``trust_remote_code=True``. They import the
  ``spla`` package rather than carrying a copy of it: the SPLA ops and Triton kernels are thousands of lines that
  would otherwise fork from the code that trained the model, and the logits are equal by construction. So the
  machine that loads the export needs ``pip install spla`` (this package).

Weights are safetensors, sharded by ``max_shard_size``; the run's tokenizer (``tokenizer`` in the checkpoint's
config) is copied. The folder is written under a temporary name and renamed into place when complete.
``verify=true`` loads the result with transformers and compares its logits with the checkpoint's model.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from ..config import ConfigError
from ..data import cli
from .convert import hf_state_dict, spec_from_model
from .spec import FAMILIES, HFModelSpec
from .tokenizer import tokenizer_files
from .weights import DEFAULT_SHARD_BYTES, parse_size, save_sharded

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
REMOTE_FILES = ("configuration_spla.py", "modeling_spla.py")
REMOTE_DIR = Path(__file__).parent / "remote"
VERIFY_TOKENS = 64


def _family(cfg: Any, net: nn.Module, family: str | None) -> str:
    if family is None:
        family = OmegaConf.select(cfg, "hf.family") or ("qwen2" if net.layers[0].attn.wq.bias is not None else "llama")
    if family not in FAMILIES:
        raise ConfigError(f"family: unknown value {family!r}; expected one of {', '.join(FAMILIES)}")
    return family


def _token_ids(cfg: Any) -> dict[str, Any]:
    """bos/eos/pad ids: the init_from checkpoint's, else looked up in the run's tokenizer."""
    ids = OmegaConf.select(cfg, "hf.token_ids")
    if ids is not None:
        return dict(OmegaConf.to_container(ids))
    folder = OmegaConf.select(cfg, "tokenizer")
    out: dict[str, Any] = {}
    if folder and (Path(folder) / "tokenizer.json").is_file() and (Path(folder) / "tokenizer_config.json").is_file():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
        config = json.loads((Path(folder) / "tokenizer_config.json").read_text())
        for name in ("bos", "eos", "pad"):
            token = config.get(f"{name}_token")
            token = token.get("content") if isinstance(token, dict) else token
            out[f"{name}_token_id"] = tok.token_to_id(token) if isinstance(token, str) else None
    return out


def _max_positions(cfg: Any) -> int:
    """The context the model was trained for (or its source's, if longer)."""
    return max(int(OmegaConf.select(cfg, "data.seq_len") or 0), int(OmegaConf.select(cfg, "hf.max_position_embeddings")
                                                                     or 0)) or 2048


def native_config(spec: HFModelSpec, dtype: str) -> Any:
    """The transformers config object of ``spec`` (this transformers version's own layout of the RoPE fields)."""
    from transformers import AutoConfig

    rope = {"rope_type": "default", "rope_theta": spec.rope_theta} if spec.rope_scaling is None else {
        **spec.rope_scaling, "rope_theta": spec.rope_theta}
    config = AutoConfig.for_model(
        spec.family, vocab_size=spec.vocab_size, hidden_size=spec.d_model, intermediate_size=spec.mlp_hidden,
        num_hidden_layers=spec.n_layers, num_attention_heads=spec.n_heads, num_key_value_heads=spec.n_kv_heads,
        head_dim=spec.head_dim, rms_norm_eps=spec.norm_eps, tie_word_embeddings=spec.tie_embeddings,
        max_position_embeddings=spec.max_position_embeddings, hidden_act="silu", **(spec.token_ids or {}))
    if hasattr(config, "rope_parameters"):  # transformers >= 5
        config.rope_parameters = rope
    else:
        config.rope_theta, config.rope_scaling = spec.rope_theta, spec.rope_scaling
    if spec.family in ("mistral", "qwen2"):
        config.sliding_window = None
    config.architectures = [FAMILIES[spec.family]]
    config.torch_dtype = dtype
    return config


def _write_native(net: nn.Module, cfg: Any, folder: Path, family: str | None, dtype: str, shard_bytes: int) -> str:
    spec = spec_from_model(net, _family(cfg, net, family), max_position_embeddings=_max_positions(cfg),
                           token_ids=_token_ids(cfg))
    native_config(spec, dtype).save_pretrained(folder)
    save_sharded(hf_state_dict(net, spec, DTYPES[dtype]), folder, shard_bytes)
    return FAMILIES[spec.family]


def _write_remote(net: nn.Module, cfg: Any, folder: Path, dtype: str, shard_bytes: int) -> str:
    try:
        version = importlib.metadata.version("spla")
    except importlib.metadata.PackageNotFoundError:
        version = None
    config = {
        "architectures": ["SPLAForCausalLM"], "model_type": "spla",
        "auto_map": {"AutoConfig": "configuration_spla.SPLAConfig",
                     "AutoModelForCausalLM": "modeling_spla.SPLAForCausalLM"},
        "spla_model": OmegaConf.to_container(cfg.model, resolve=True), "spla_version": version,
        "vocab_size": net.vocab_size, "hidden_size": net.d_model, "num_hidden_layers": net.n_layers,
        "num_attention_heads": net.n_heads, "num_key_value_heads": net.n_kv_heads, "head_dim": net.head_dim,
        "intermediate_size": net.mlp_hidden, "max_position_embeddings": _max_positions(cfg),
        "tie_word_embeddings": net.tie_embeddings, "torch_dtype": dtype, "use_cache": False, **_token_ids(cfg),
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in REMOTE_FILES:
        shutil.copyfile(REMOTE_DIR / name, folder / name)
    state = net.state_dict()
    if net.tie_embeddings:
        state.pop("lm_head.weight")  # tied: one tensor, restored by the tie
    cast = DTYPES[dtype]
    save_sharded({f"model.{k}": (v.to(cast) if v.is_floating_point() else v).clone() for k, v in state.items()},
                 folder, shard_bytes)
    return "SPLAForCausalLM (trust_remote_code=True; needs the spla package)"


@torch.no_grad()
def verify_export(folder: str | os.PathLike, net: nn.Module, tokens: int = VERIFY_TOKENS) -> float:
    """Load ``folder`` with ``AutoModelForCausalLM`` and return the max abs difference of its logits and ``net``'s
    on one random sequence of ``tokens`` tokens (float32)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True, dtype=torch.float32).eval()
    ids = torch.randint(0, net.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    ours = net.float()(ids)
    return float((model(ids).logits.float() - ours.float()).abs().max())


def export(ckpt_path: str | os.PathLike, out: str | os.PathLike, *, family: str | None = None,
           dtype: str = "float32", max_shard_size: str | int = DEFAULT_SHARD_BYTES, overwrite: bool = False,
           verify: bool = False, tolerance: float = 1e-4) -> Path:
    """Export the checkpoint ``ckpt_path`` (a ``.ckpt`` file or a run folder) to the folder ``out`` (see the module
    docstring); returns ``out``. ``ConfigError`` naming the argument for a bad value, an existing ``out`` without
    ``overwrite``, or (``verify``) logits that differ by more than ``tolerance``."""
    from ..eval.loading import attention_kind, load_model
    from ..training.fsdp import swap_in

    if dtype not in DTYPES:
        raise ConfigError(f"dtype: unknown value {dtype!r}; expected one of {', '.join(DTYPES)}")
    shard_bytes = parse_size(max_shard_size)
    out = Path(out)
    if out.exists() and not overwrite:
        raise ConfigError(f"out: {out} exists; give another folder or overwrite=true")
    loaded = load_model(ckpt_path, impl="auto")  # the model classes only, weights strictly
    net, cfg = loaded.net.float().eval(), loaded.cfg
    native = attention_kind(cfg) == "DenseAttention"
    if family is not None and not native:
        raise ConfigError(f"family: only model=dense exports to a native family; this model uses "
                          f"{attention_kind(cfg)} (exported with its modeling code)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        if native:
            what = _write_native(net, cfg, tmp, family, dtype, shard_bytes)
        else:
            what = _write_remote(net, cfg, tmp, dtype, shard_bytes)
        tokenizer = OmegaConf.select(cfg, "tokenizer")
        files = tokenizer_files(tokenizer) if tokenizer else []
        for file in files:
            shutil.copy2(file, tmp / file.name)
        if not files:
            log.warning("export: the checkpoint names no tokenizer (a run on synthetic data); none copied")
        if verify:
            diff = verify_export(tmp, net)
            log.info("export: logits of the exported model differ by at most %.3g from the checkpoint's", diff)
            if not diff <= tolerance:
                raise ConfigError(f"verify: the exported model's logits differ by {diff:.3g} > {tolerance}")
        swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %s (step %d) as %s to %s", loaded.ckpt_path, loaded.global_step, what, out)
    return out


OPTIONS = [
    cli.Option("ckpt_path", str, help="a checkpoint written by train.py (a .ckpt file) or a run folder"),
    cli.Option("out", str, help="the model folder to write"),
    cli.Option("family", str, None, "model=dense only: llama | mistral | qwen2 (default: init_from's, else llama)"),
    cli.Option("dtype", str, "float32", "float32 | bfloat16 | float16"),
    cli.Option("max_shard_size", str, "5GB", "largest safetensors file, e.g. 2GB"),
    cli.Option("overwrite", cli.as_bool, False, "replace an existing out folder"),
    cli.Option("verify", cli.as_bool, False, "load the export with transformers and compare logits"),
]


def main(argv: list[str] | None = None) -> None:
    cli.main("spla_lit.export", __doc__, OPTIONS, export, argv)
