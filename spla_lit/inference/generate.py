"""Generation with a KV cache: prefill each row's prompt with the training ops, then decode token by token.

:func:`generate` is ``DecoderLM.generate``; :func:`fill_greedy` decodes the marked positions of given sequences
with the others given (the evaluation's generated answers, ``eval.py decode=generate``).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from .cache import KVCache
from .step import DecodeStep

EOS_CHECK_EVERY = 16  # decode steps between checks (one host sync each) that every row has stopped


def _check_ids(input_ids: object) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point() \
            or input_ids.shape[1] == 0 or input_ids.shape[0] == 0:
        got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a non-empty integer [B, N] tensor, got {got}")
    return input_ids


def _check_lengths(prompt_lengths: object, B: int, N: int) -> list[int]:
    if prompt_lengths is None:
        return [N] * B
    values = prompt_lengths.tolist() if isinstance(prompt_lengths, torch.Tensor) else prompt_lengths
    if not isinstance(values, (list, tuple)) or len(values) != B or not all(
            isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= N for n in values):
        raise ValueError(f"prompt_lengths must hold B = {B} integers in [1, {N}] (the input_ids width), "
                         f"got {prompt_lengths!r}")
    return list(values)


def _cache_dtype(model: nn.Module, device: torch.device) -> torch.dtype | None:
    """Under autocast, K/V come out in the autocast dtype: keep them so (None: the parameters' dtype)."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


class Decoder:
    """A model, its cache for ``batch_size`` rows of up to ``max_seq_len`` tokens, and the two things decoding
    does: :meth:`prefill` (ragged prompts) and :meth:`step` (one token per row, a CUDA graph where possible)."""

    def __init__(self, model: nn.Module, batch_size: int, max_seq_len: int, *, device: torch.device,
                 cuda_graph: bool | None = None) -> None:
        self.model = model
        self.cache: KVCache = model.new_cache(batch_size, max_seq_len, device=device,
                                              dtype=_cache_dtype(model, device))
        self.cuda_graph = cuda_graph
        self._step: DecodeStep | None = None

    def prefill(self, input_ids: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """Feed row b its prompt ``input_ids[b, :lengths[b]]`` (rows of equal length together, with the training
        ops); returns the logits after each row's last prompt token, [B, vocab]."""
        out, b, B = [], 0, len(lengths)
        while b < B:
            e = b + 1
            while e < B and lengths[e] == lengths[b]:
                e += 1
            rows = self.cache if (b, e) == (0, B) else self.cache.rows(b, e)
            ids = input_ids[b:e, : lengths[b]]
            last = getattr(self.model, "_forward_cached", None)  # DecoderLM: no [B, T, vocab] logits for a prompt
            logits = last(ids, None, rows, last_only=True) if last is not None else self.model(ids, cache=rows)
            out.append(logits[:, -1])
            b = e
        return torch.cat(out)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [B, vocab] after one more token per row (``tokens`` int [B])."""
        if self._step is None:
            self._step = DecodeStep(self.model, self.cache, cuda_graph=self.cuda_graph)
        return self._step(tokens)


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token int64 [B] from logits [B, vocab]: argmax at temperature 0, else a draw from the softmax of
    ``logits / temperature`` restricted to the smallest set of tokens holding ``top_p`` of the mass."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, -1)
    if top_p < 1:
        p, idx = probs.sort(-1, descending=True)
        drop = p.cumsum(-1) - p > top_p  # tokens after the nucleus (the first token always stays)
        probs = torch.zeros_like(probs).scatter_(-1, idx, p.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, *, prompt_lengths=None,
             temperature: float = 0.0, top_p: float = 1.0, eos_token_id: int | None = None,
             generator: torch.Generator | None = None, cuda_graph: bool | None = None,
             timings: dict | None = None) -> torch.Tensor:
    """Continue each row's prompt by ``max_new_tokens`` tokens: LongTensor [B, max_new_tokens].

    Args:
        model: a ``DecoderLM`` (anything with ``new_cache`` and ``forward(ids, cache=)``).
        input_ids: int [B, N] prompts, row b's being ``input_ids[b, :prompt_lengths[b]]`` (the rest is ignored).
        prompt_lengths: B ints in [1, N] (list or tensor); None: every row is N long.
        temperature: 0 is greedy (deterministic); > 0 samples from ``softmax(logits / temperature)``.
        top_p: nucleus sampling, in (0, 1].
        eos_token_id: a row stops after producing it; its later positions hold ``eos_token_id`` too.
        generator: the RNG of sampling.
        cuda_graph: replay the decode step as a CUDA graph (None: on CUDA when possible).
        timings: a dict to receive ``prefill_s``, ``decode_s`` (wall seconds, the device synchronised) and
            ``decode_steps``.

    Each row gets what it would get alone: its prompt is prefilled by the training ops, then every step feeds
    one token per row through the cache (``model.new_cache``), rows at their own positions.
    """
    ids = _check_ids(input_ids)
    B, N = ids.shape
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    lengths = _check_lengths(prompt_lengths, B, N)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    vocab = getattr(model, "vocab_size", None)
    if eos_token_id is not None and (isinstance(eos_token_id, bool) or not isinstance(eos_token_id, int)
                                     or eos_token_id < 0 or (vocab is not None and eos_token_id >= vocab)):
        raise ValueError(f"eos_token_id must be a token id in [0, {vocab}) or None, got {eos_token_id!r}")
    out = torch.full((B, max_new_tokens), -1 if eos_token_id is None else eos_token_id, dtype=torch.long,
                     device=ids.device)
    if max_new_tokens == 0:
        return out
    clock = _Clock(ids.device, timings)
    dec = Decoder(model, B, max(lengths) + max_new_tokens, device=ids.device, cuda_graph=cuda_graph)
    tok = sample(dec.prefill(ids, lengths), temperature, top_p, generator)
    clock.lap("prefill_s")
    done = torch.zeros(B, dtype=torch.bool, device=ids.device)
    steps = 0
    for i in range(max_new_tokens):
        if eos_token_id is not None:
            tok = torch.where(done, eos_token_id, tok)
            done |= tok == eos_token_id
        out[:, i] = tok
        if i + 1 == max_new_tokens or (eos_token_id is not None and (i + 1) % EOS_CHECK_EVERY == 0
                                       and bool(done.all())):
            break
        tok = sample(dec.step(tok), temperature, top_p, generator)
        steps += 1
    clock.lap("decode_s")
    if timings is not None:
        timings["decode_steps"] = steps
    return out


class _Clock:
    """Wall-clock laps into ``timings`` (synchronising the device), or nothing when it is None."""

    def __init__(self, device: torch.device, timings: dict | None) -> None:
        self.device, self.timings = device, timings
        self.t = self._now()

    def _now(self) -> float:
        if self.timings is None:
            return 0.0
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def lap(self, name: str) -> None:
        if self.timings is not None:
            now = self._now()
            self.timings[name] = now - self.t
            self.t = now


@torch.no_grad()
def fill_greedy(model: nn.Module, tokens: torch.Tensor, fill: torch.Tensor, *,
                cuda_graph: bool | None = None) -> torch.Tensor:
    """``tokens`` [B, N] with every position where ``fill`` [B, N] is True replaced by the model's greedy
    prediction, decoding left to right: a filled token is predicted from the tokens before it as decoded (the
    earlier predictions, not the given tokens, at filled positions), the other tokens are given. The first
    filled position of a row ends its prompt (prefilled); position 0 cannot be filled. This is generation of
    the answers of a prompt whose answer section interleaves given tokens (markers, further queries).
    """
    ids = _check_ids(tokens)
    B, N = ids.shape
    if not isinstance(fill, torch.Tensor) or fill.dtype != torch.bool or tuple(fill.shape) != (B, N):
        raise ValueError(f"fill must be a bool [B, N] = [{B}, {N}] tensor")
    if bool(fill[:, 0].any()):
        raise ValueError("fill: position 0 has no prefix to predict it from")
    out = ids.clone()
    has = fill.any(1).tolist()
    pos = torch.arange(N, device=ids.device)
    first = torch.where(fill, pos, N).amin(1).tolist()
    last = torch.where(fill, pos, -1).amax(1).tolist()
    rows = [b for b in range(B) if has[b]]
    if not rows:
        return out
    start = [first[b] for b in rows]  # the prompt of each row: tokens before its first filled position
    steps = max(last[b] - first[b] for b in rows)
    sub = torch.tensor(rows, device=ids.device)
    dec = Decoder(model, len(rows), max(start) + steps + 1, device=ids.device, cuda_graph=cuda_graph)
    pred = dec.prefill(ids[sub], start).argmax(-1)
    at = torch.tensor(start, device=ids.device)  # the position each row predicts now
    for s in range(steps + 1):
        p = (at + s).clamp(max=N - 1)
        given = ids[sub, p]
        tok = torch.where(fill[sub, p], pred, given)
        out[sub, p] = torch.where(at + s < N, tok, out[sub, p])
        if s == steps:
            break
        pred = dec.step(tok).argmax(-1)
    return out
