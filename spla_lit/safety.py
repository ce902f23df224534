"""What a config may build: an explicit allowlist for every ``_target_``.

Hydra's ``instantiate`` imports and calls whatever dotted name a config's ``_target_`` holds. The run
config stored in every checkpoint (``checkpoint["spla_config"]``) rebuilds the model in ``eval.py``, so a
crafted checkpoint naming ``builtins.open`` or ``pathlib.Path.touch`` would run that call: loading the
tensors with ``weights_only=True`` does not make such a file safe. Every path that builds objects from a
config (training, resume, eval, consolidate, later export/generate code) therefore goes through
:func:`check_targets` / :func:`safe_instantiate`, which accept only the names listed below and refuse
anything else before anything is built, naming the key and the target. Adding a config with a new
``_target_`` means adding it here (``tests/training/test_safety.py`` walks ``conf/`` and fails otherwise).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from omegaconf import OmegaConf

from .config import ConfigError

# The model classes: all that eval.py (and later export code) rebuilds from a checkpoint.
MODEL_TARGETS: frozenset[str] = frozenset({
    "spla_lit.models.DecoderLM",
    "spla_lit.layers.SPLAAttention",
    "spla_lit.layers.DenseAttention",
    "spla_lit.layers.LinearAttention",
    "spla_lit.layers.BlockScorer",
    "spla_lit.layers.BlockSparseAttention",
    "spla_lit.layers.ResidualLinearAttention",
})

# The project's training classes the shipped configs name.
TRAINING_TARGETS: frozenset[str] = frozenset({
    "spla_lit.training.LMModule",
    "spla_lit.training.Throughput",
    "spla_lit.training.GracefulStop",
    "spla_lit.training.StepProgressBar",
    "spla_lit.training.ModelSummary",
    "spla_lit.data.SyntheticDataModule",
    "spla_lit.data.TokenDataModule",
    "spla_lit.eval.callbacks.SelectionFidelity",
    "spla_lit.training.fsdp.FSDP2Strategy",
})

# Library classes the shipped configs name (each one reviewed: none writes a file or runs a command from
# its arguments alone, beyond the logger / checkpoint folders a training run writes anyway).
LIBRARY_TARGETS: frozenset[str] = frozenset({
    "torch.optim.AdamW",
    "lightning.pytorch.Trainer",
    "lightning.pytorch.callbacks.ModelCheckpoint",
    "lightning.pytorch.callbacks.LearningRateMonitor",
    "lightning.pytorch.loggers.TensorBoardLogger",
    "lightning.pytorch.loggers.CSVLogger",
    "lightning.pytorch.strategies.DDPStrategy",
})

ALLOWED_TARGETS: frozenset[str] = MODEL_TARGETS | TRAINING_TARGETS | LIBRARY_TARGETS

# Hydra's reserved keys and the values each may take (anything else is refused).
_FLAGS = {"_partial_": (True, False), "_recursive_": (True, False), "_convert_": ("none", "partial", "object", "all")}


class UnsafeConfigError(ConfigError):
    """A config names a ``_target_`` outside the allowlist (or hides one); the message names key and target."""


def _join(key: str, part: str | int) -> str:
    if isinstance(part, int):
        return f"{key}[{part}]"
    return f"{key}.{part}" if key else str(part)


def _plain(node: Any, resolve: bool) -> Any:
    return OmegaConf.to_container(node, resolve=resolve) if OmegaConf.is_config(node) else node


def _is_interpolation(value: str) -> bool:
    return "${" in value


def check_targets(node: Any, key: str = "", allowed: Iterable[str] = ALLOWED_TARGETS, *,
                  stored: bool = False) -> None:
    """Raise :class:`UnsafeConfigError` unless every ``_target_`` in ``node`` is one of ``allowed``.

    ``node``: a DictConfig / ListConfig or plain dicts and lists, walked whole (``_args_``, lists, nested
    dicts), interpolations left unresolved. ``key``: where ``node`` sits, for the messages
    (``spla_config.model``). ``stored=True`` (a config read from a file, e.g. a checkpoint's, which is saved
    resolved) also refuses any ``${...}`` interpolation, which could build a node at resolution time.
    Hydra's flags must be plain values (``_partial_: true``...). Nothing is imported or called.
    """
    _walk(node, key, frozenset(allowed), stored)


def _walk(node: Any, key: str, allowed: frozenset[str], stored: bool) -> None:
    node = _plain(node, resolve=False)  # a config nested in plain containers: its items would resolve
    if isinstance(node, Mapping):
        for name, value in node.items():
            where = _join(key, str(name))
            if name == "_target_":
                if not isinstance(value, str) or value not in allowed:
                    raise UnsafeConfigError(
                        f"{where}: {value!r} is not an allowed target; a config may only build the classes "
                        "listed in spla_lit.safety.ALLOWED_TARGETS (nothing was built)")
            elif name in _FLAGS and value not in _FLAGS[name]:
                raise UnsafeConfigError(f"{where}: {value!r} is not a valid value (expected one of "
                                        f"{', '.join(map(str, _FLAGS[name]))})")
            _walk(value, where, allowed, stored)
    elif isinstance(node, Sequence) and not isinstance(node, (str, bytes)):
        for i, value in enumerate(node):
            _walk(value, _join(key, i), allowed, stored)
    elif stored and isinstance(node, str) and _is_interpolation(node):
        raise UnsafeConfigError(f"{key}: {node!r} is an interpolation, which a stored config never holds "
                                "(checkpoints store resolved values)")


def safe_instantiate(node: Any, key: str, allowed: Iterable[str] = ALLOWED_TARGETS, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate(node, **kwargs)`` after :func:`check_targets`, the one public way to build
    objects from a config.

    The targets are checked as written and again after resolving interpolations (a resolver could produce
    a node), then the resolved plain copy is instantiated; ``kwargs`` (objects passed by the code, e.g. the
    callbacks of a ``Trainer``) are not checked. Raises :class:`UnsafeConfigError` naming ``key``.
    """
    from hydra.utils import instantiate

    check_targets(node, key, allowed)
    resolved = copy.deepcopy(_plain(node, resolve=True))
    check_targets(resolved, key, allowed, stored=True)
    return instantiate(resolved, **kwargs)
