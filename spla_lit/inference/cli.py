"""``python generate.py``: continue prompts with a trained checkpoint (``generate.py`` is a thin wrapper).

Prompts are token ids (``prompt_ids=[1,2,3]``, or a list of lists for several rows) or text (``prompt="..."``)
with a tokenizer: ``tokenizer=<folder or tokenizer.json>``, else the one the checkpoint's training data was
prepared with (``data.path``'s manifest records it), else a ``tokenizer`` key of the stored config. Prints each
continuation and the throughput; writes ``generation.json`` to ``output_dir``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from ..config import ConfigError
from ..data.shards import MANIFEST, write_json
from ..eval.loading import load_model
from ..eval.ruler import autocast
from ..eval.runner import _plain, resolve_device, resolve_precision
from ..options import IMPLS
from .generate import generate

log = logging.getLogger(__name__)


def _prompt_rows(value: Any, key: str) -> list:
    """One prompt or a list of prompts -> a list of rows."""
    value = OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value
    if isinstance(value, str) or (isinstance(value, list) and value and isinstance(value[0], int)):
        return [value]
    if isinstance(value, list) and value:
        return value
    raise ConfigError(f"{key}: expected one prompt or a non-empty list of prompts, got {value!r}")


def _tokenizer_path(cfg: DictConfig, train_cfg: DictConfig) -> Path | None:
    """``tokenizer=``, else the checkpoint's: its prepared data's manifest, or a stored ``tokenizer`` key."""
    if cfg.get("tokenizer"):
        return Path(cfg.tokenizer)
    data_path = OmegaConf.select(train_cfg, "data.path", default=None)
    if data_path and (Path(data_path) / MANIFEST).is_file():
        recorded = json.loads((Path(data_path) / MANIFEST).read_text()).get("tokenizer")
        if recorded and Path(recorded).exists():
            return Path(recorded)
    stored = OmegaConf.select(train_cfg, "tokenizer", default=None)
    return Path(stored) if isinstance(stored, str) and Path(stored).exists() else None


def load_tokenizer(path: Path):
    """(``tokenizers.Tokenizer``, EOS id or None) from a folder holding ``tokenizer.json`` or the file itself
    (EOS: ``eos_token`` of ``tokenizer_config.json`` beside it, as ``spla_lit.data.train_tokenizer`` writes)."""
    try:
        import tokenizers
    except ImportError:
        raise ConfigError("prompt: text prompts need the `tokenizers` package (pip install -e '.[hf]')") from None
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"tokenizer: {file} does not exist (give a folder holding tokenizer.json, or the file)")
    tok = tokenizers.Tokenizer.from_file(str(file))
    eos = None
    config = file.with_name("tokenizer_config.json")
    if config.is_file():
        name = json.loads(config.read_text()).get("eos_token")
        eos = tok.token_to_id(name) if isinstance(name, str) else None
    return tok, eos


def _check(cfg: DictConfig) -> None:
    if cfg.impl not in IMPLS:
        raise ConfigError(f"impl: unknown value {cfg.impl!r}; expected one of {', '.join(IMPLS)}")
    if (cfg.prompt_ids is None) == (cfg.prompt is None):
        raise ConfigError("prompt_ids / prompt: give exactly one (token ids, or text with a tokenizer)")
    if isinstance(cfg.max_new_tokens, bool) or not isinstance(cfg.max_new_tokens, int) or cfg.max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens: must be an integer >= 1, got {cfg.max_new_tokens!r}")
    if cfg.cuda_graph not in ("auto", True, False):
        raise ConfigError(f"cuda_graph: expected auto, true or false, got {cfg.cuda_graph!r}")


def run(cfg: DictConfig) -> dict[str, Any]:
    """Generate as configured by ``conf/generate.yaml``; returns (and writes) the results."""
    _check(cfg)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    loaded = load_model(cfg.ckpt_path, _plain(cfg.get("override")), impl=cfg.impl, device=device)
    net, vocab = loaded.net, loaded.net.vocab_size
    tokenizer, eos = None, cfg.eos_token_id
    if cfg.prompt is not None:
        path = _tokenizer_path(cfg, loaded.cfg)
        if path is None:
            raise ConfigError("prompt: no tokenizer is attached to this checkpoint; give tokenizer=<folder with "
                              "tokenizer.json> or token ids with prompt_ids=[...]")
        tokenizer, tok_eos = load_tokenizer(path)
        eos = tok_eos if eos is None else eos
        rows = [tokenizer.encode(text).ids for text in _prompt_rows(cfg.prompt, "prompt")]
    else:
        rows = _prompt_rows(cfg.prompt_ids, "prompt_ids")
    for i, row in enumerate(rows):
        if not isinstance(row, list) or not row or not all(isinstance(t, int) and 0 <= t < vocab for t in row):
            key = "prompt" if tokenizer is not None else "prompt_ids"
            raise ConfigError(f"{key}: prompt {i} must be a non-empty list of token ids in [0, {vocab}), got {row!r}")
    lengths = [len(r) for r in rows]
    ids = torch.zeros(len(rows), max(lengths), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
    generator = torch.Generator(device=device).manual_seed(int(cfg.seed))
    timings: dict[str, float] = {}
    with torch.inference_mode(), autocast(device, precision):
        out = generate(net, ids.to(device), cfg.max_new_tokens, prompt_lengths=lengths, temperature=cfg.temperature,
                       top_p=cfg.top_p, eos_token_id=eos, generator=generator,
                       cuda_graph=None if cfg.cuda_graph == "auto" else bool(cfg.cuda_graph), timings=timings)
    out = out.cpu()
    results: dict[str, Any] = {"ckpt_path": loaded.ckpt_path, "device": str(device), "precision": precision,
                               "impl": cfg.impl, "temperature": cfg.temperature, "top_p": cfg.top_p,
                               "eos_token_id": eos, "rows": []}
    new_tokens = 0
    for i, row in enumerate(rows):
        cont = out[i].tolist()
        if eos is not None and eos in cont:
            cont = cont[: cont.index(eos) + 1]
        new_tokens += len(cont)
        entry = {"prompt_ids": row, "continuation_ids": cont}
        if tokenizer is not None:
            entry["prompt"] = tokenizer.decode(row)
            entry["continuation"] = tokenizer.decode(cont)
        results["rows"].append(entry)
        print(f"[{i}] prompt ({len(row)} tokens): {entry.get('prompt', row)!r}")
        print(f"[{i}] continuation: {entry.get('continuation', cont)!r}")
    steps = timings.get("decode_steps", 0)
    total = timings["prefill_s"] + timings["decode_s"]
    results["throughput"] = {
        "prefill_s": timings["prefill_s"], "prompt_tokens": sum(lengths), "decode_s": timings["decode_s"],
        "decode_steps": steps, "decode_tokens_per_s": len(rows) * steps / timings["decode_s"] if steps else None,
        "tokens_per_s": new_tokens / total if total > 0 else None}
    tp = results["throughput"]
    print(f"prefill {sum(lengths)} tokens in {tp['prefill_s']:.3f} s; decode {steps} steps x {len(rows)} rows in "
          f"{tp['decode_s']:.3f} s ({tp['decode_tokens_per_s'] or 0:.1f} tokens/s); "
          f"{new_tokens} new tokens at {tp['tokens_per_s'] or 0:.1f} tokens/s overall")
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "generation.json", results)
    log.info("wrote %s", out_dir / "generation.json")
    return results
