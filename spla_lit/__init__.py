"""SPLA attention: ops, layers, models, data and Lightning training (see README.md)."""

from omegaconf import OmegaConf


def _prepared_vocab_size(path: str) -> int:
    from .data.shards import prepared_vocab_size  # imported when a config uses it: `import spla_lit` stays light

    return prepared_vocab_size(path)


# conf/data/tokens.yaml: `vocab_size: ${prepared_vocab_size:${data.path}}` (the tokenizer's, from the manifest)
if not OmegaConf.has_resolver("prepared_vocab_size"):
    OmegaConf.register_new_resolver("prepared_vocab_size", _prepared_vocab_size, use_cache=True)
