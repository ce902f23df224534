"""Build a ``DecoderLM`` from a stored model config (an exported ``config.json``'s ``spla_model``), for the
remote modeling code of SPLA exports (``modeling_spla.py``), without ``transformers``.

A stored config names the classes it builds (``_target_``); a crafted file could name anything, so only the
model classes are accepted.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from ..config import ConfigError

# TODO(safety): once spla_lit.safety lands on main, delete MODEL_TARGETS and _check_targets and make
# build_decoder `return safe_instantiate(model_cfg, key, MODEL_TARGETS)` (from ..safety import ...).
MODEL_TARGETS = frozenset({
    "spla_lit.models.DecoderLM", "spla_lit.layers.SPLAAttention", "spla_lit.layers.DenseAttention",
    "spla_lit.layers.LinearAttention", "spla_lit.layers.BlockScorer", "spla_lit.layers.BlockSparseAttention",
    "spla_lit.layers.ResidualLinearAttention",
})
_FLAGS = {"_partial_": (True, False), "_recursive_": (True, False), "_convert_": ("none", "partial", "object", "all")}


def _check_targets(node: Any, key: str) -> None:
    if isinstance(node, Mapping):
        for name, value in node.items():
            where = f"{key}.{name}"
            if name == "_target_" and value not in MODEL_TARGETS:
                allowed = ", ".join(sorted(MODEL_TARGETS))
                raise ConfigError(f"{where}: {value!r} is not a model class (allowed: {allowed}); nothing was built")
            if name in _FLAGS and value not in _FLAGS[name]:
                raise ConfigError(f"{where}: {value!r} is not a valid value")
            if isinstance(value, str) and "${" in value:
                raise ConfigError(f"{where}: {value!r}: a stored config holds no interpolation")
            _check_targets(value, where)
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            _check_targets(value, f"{key}[{i}]")


def build_decoder(model_cfg: Mapping[str, Any], key: str = "spla_model") -> nn.Module:
    """The ``DecoderLM`` of a stored (resolved) model config; :class:`ConfigError` naming ``key`` if it builds
    anything but the model classes."""
    from hydra.utils import instantiate

    if not isinstance(model_cfg, Mapping) or model_cfg.get("_target_") != "spla_lit.models.DecoderLM":
        raise ConfigError(f"{key}: expected the config of a spla_lit.models.DecoderLM, got {type(model_cfg).__name__}")
    _check_targets(model_cfg, key)
    return instantiate(dict(model_cfg))


def init_module(module: nn.Module, std: float = 0.02) -> None:
    """Initialise one module as ``DecoderLM`` does (for transformers' ``_init_weights``, which only calls it for
    modules whose tensors a checkpoint did not fill): RoPE tables recomputed, zero-initialised gates at zero,
    other linear layers and embeddings normal(0, std), norms at one."""
    from ..layers.norm import RMSNorm
    from ..layers.rope import RotaryEmbedding

    if isinstance(module, RotaryEmbedding):
        module.reset_inv_freq()
    elif isinstance(module, nn.Linear):
        if getattr(module, "zero_init", False):
            nn.init.zeros_(module.weight)
        else:
            nn.init.normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=std)
    elif isinstance(module, RMSNorm):
        nn.init.ones_(module.weight)


