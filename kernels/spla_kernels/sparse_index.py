"""Index bookkeeping for the sparse kernels (plain torch, no Triton).

A selection ``block_idx [B, Hkv, nQ, topk]`` is turned into three views:

* **units**: the key ranges the kernels load. Without ``cu_seqlens`` unit ``u`` is key block ``u``
  (keys ``[u * bs, min((u + 1) * bs, N))``); with packed sequences every (sequence, local block) pair is
  one unit, so a unit never crosses a sequence boundary and block indices stay local to each sequence.
* **query groups** (forward and dQ): ``bq`` consecutive tokens of one (batch, KV head) share one list of
  units, the sorted union of their selections, with a bit mask per unit saying which of the ``bq``
  tokens selected it. The kernel loads each unit of the union once for all ``bq * G`` query rows and
  masks per token, so selection stays per token while the tensor-core tiles get taller.
* **transposed items** (dK, dV): for every (query window, batch x KV head, unit) the tokens that selected
  the unit, ascending. Windows of ``window`` tokens bound the work of one program and keep the query
  rows that concurrent programs gather within a small span (L2 reuse).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spla_lit.ops.utils import cdiv, sequence_segments

_BIG = 2**31 - 1


@dataclass
class Units:
    """Key ranges: unit ``u`` covers keys ``[start[u], end[u])`` of its batch row (int32 [nU] each)."""

    start: torch.Tensor
    end: torch.Tensor
    n_seqs: int = 1  # packed sequences (cu_seqlens) the table spans

    @property
    def count(self) -> int:
        return int(self.start.numel())


def token_units(block_idx: torch.Tensor, n: int, block_size: int, query_block: int,
                cu_seqlens: torch.Tensor | None) -> tuple[torch.Tensor, Units]:
    """Per-token unit lists ``[B * Hkv, N, topk]`` int32 (-1 padded) and the unit table.

    Entries that can hold no causal key for the token (block start after the token), duplicates and
    -1 padding all become -1, so the kernels never load a tile that contributes nothing.
    """
    B, Hkv, _, topk = block_idx.shape
    dev = block_idx.device
    tok = block_idx.long()
    if query_block > 1:
        tok = tok.repeat_interleave(query_block, dim=2)[:, :, :n]
    t = torch.arange(n, device=dev)
    if cu_seqlens is None:
        local_t = t
        nk = cdiv(n, block_size)
        start = torch.arange(nk, device=dev) * block_size
        end = torch.clamp(start + block_size, max=n)
        offset = torch.zeros(n, dtype=torch.long, device=dev)
    else:
        segments = sequence_segments(cu_seqlens, batch=B, n=n)
        lens = [e - a for a, e in segments]
        nblk = [cdiv(x, block_size) for x in lens]
        boff = [0]
        for c in nblk:
            boff.append(boff[-1] + c)
        starts, ends = [], []
        for (a, e), c in zip(segments, nblk):
            for j in range(c):
                starts.append(a + j * block_size)
                ends.append(min(a + (j + 1) * block_size, e))
        start = torch.tensor(starts, dtype=torch.long, device=dev)
        end = torch.tensor(ends, dtype=torch.long, device=dev)
        lens_t = torch.tensor(lens, device=dev)
        seq = torch.repeat_interleave(torch.arange(len(lens), device=dev), lens_t, output_size=n)
        local_t = t - torch.tensor([a for a, _ in segments], device=dev)[seq]
        offset = torch.tensor(boff[:-1], device=dev)[seq]
    keep = (tok >= 0) & (tok * block_size <= local_t[None, None, :, None])
    # Duplicates in a token's list would be counted twice by the union's bit masks: drop them.
    srt = torch.where(keep, tok, _BIG).sort(-1).values
    dup = torch.zeros_like(keep)
    dup[..., 1:] = srt[..., 1:] == srt[..., :-1]
    units = torch.where((srt != _BIG) & ~dup, srt + offset[None, None, :, None], -1)
    n_seqs = 1 if cu_seqlens is None else cu_seqlens.numel() - 1
    return (units.reshape(B * Hkv, n, topk).to(torch.int32),
            Units(start.to(torch.int32), end.to(torch.int32), n_seqs))


@dataclass
class Groups:
    """Per (batch x KV head, query group): the union of the group's units and who selected each.

    units, bits: int32 [BH, nG, W] (W = bq * topk; entries past ``count`` are -1 / 0);
    count: int32 [BH, nG]; bit ``t`` of ``bits`` is set when token ``g * bq + t`` selected the unit;
    start: int32 [BH, nG, W], the units' first key (0 past ``count``), so a kernel needs no second lookup.
    """

    bq: int
    units: torch.Tensor
    bits: torch.Tensor
    count: torch.Tensor
    start: torch.Tensor | None = None

    def with_starts(self, unit_start: torch.Tensor) -> Groups:
        if self.start is None:
            self.start = unit_start[self.units.clamp(min=0).long()].masked_fill(self.units < 0, 0).contiguous()
        return self


def query_groups(tok_units: torch.Tensor, bq: int) -> Groups:
    """Union of the unit lists of ``bq`` consecutive tokens, sorted ascending (``bq`` <= 30)."""
    if not 1 <= bq <= 30:
        raise ValueError(f"tokens per query group must be in [1, 30], got {bq}")
    BH, n, topk = tok_units.shape
    ng = cdiv(n, bq)
    x = torch.nn.functional.pad(tok_units, (0, 0, 0, ng * bq - n), value=-1).view(BH, ng, bq * topk)
    if bq == 1:
        valid = x >= 0  # already sorted, unique, padding last
        return Groups(1, x.contiguous(), valid.to(torch.int32), valid.sum(-1, dtype=torch.int32))
    vals, order = torch.where(x < 0, _BIG, x).sort(-1)
    bit = torch.bitwise_left_shift(torch.ones_like(order), order // topk)
    first = torch.ones_like(vals, dtype=torch.bool)
    first[..., 1:] = vals[..., 1:] != vals[..., :-1]
    valid = vals != _BIG
    run = torch.cumsum(first, -1) - 1
    units = torch.full_like(vals, -1).scatter_(-1, run, torch.where(valid, vals, -1))
    bits = torch.zeros_like(order).scatter_add_(-1, run, torch.where(valid, bit, 0))
    count = (first & valid).sum(-1, dtype=torch.int32)
    return Groups(bq, units.to(torch.int32), bits.to(torch.int32), count)


@dataclass
class Items:
    """Work items of the dK/dV kernel: item ``i`` covers tokens ``tokens[off[i] : off[i] + length[i]]``
    (ascending) that selected unit ``seg[i] % nU`` of batch x KV head ``seg[i] // nU``. int32 tensors.
    The list is sized by a host-side bound, not the real count: items past it have ``length`` 0."""

    tokens: torch.Tensor
    seg: torch.Tensor
    off: torch.Tensor
    length: torch.Tensor


def items_bound(bh: int, n: int, topk: int, units: Units, block_size: int, window: int) -> int:
    """Upper bound on the number of (window, bh, unit) items, from shapes only (no device read): a
    window can only reach the units that start before its end (at most ``end / block_size`` plus one per
    extra packed sequence), and there are at most ``topk`` items per token."""
    extra = units.n_seqs - 1
    per_bh = sum(min(units.count, cdiv(min(n, w + window), block_size) + extra) for w in range(0, n, window))
    return max(1, min(bh * per_bh, bh * n * topk))


def transposed_items(tok_units: torch.Tensor, units: Units, block_size: int, window: int | None) -> Items:
    """Invert the per-token unit lists: for each (query window, bh, unit) the tokens that selected it.

    Items are ordered window-major, so programs running together gather the rows of one window. No host
    sync: the list has :func:`items_bound` entries, the unused ones with length 0 (the kernel skips them),
    so the CPU can queue the rest of the backward while the GPU works.
    """
    BH, n, topk = tok_units.shape
    dev = tok_units.device
    window = n if window is None else max(1, min(window, n))
    nw = cdiv(n, window)
    n_units = units.count
    u = tok_units.long()
    w = (torch.arange(n, device=dev) // window)[None, :, None]
    bh = torch.arange(BH, device=dev)[:, None, None]
    nseg = BH * n_units
    key = torch.where(u >= 0, (w * BH + bh) * n_units + u, nw * nseg).flatten()
    # Stable sort: the flat order is (bh, token, k), so tokens stay ascending inside each segment.
    skey, perm = torch.sort(key, stable=True)
    tokens = ((perm // topk) % n).to(torch.int32)
    valid = skey < nw * nseg
    first = torch.ones_like(valid)
    first[1:] = skey[1:] != skey[:-1]
    first &= valid
    bound = items_bound(BH, n, topk, units, block_size, window)
    slot = torch.where(first, torch.cumsum(first, 0) - 1, bound)  # item index of each segment's first entry
    starts = torch.zeros(bound + 1, dtype=torch.long, device=dev)
    starts.scatter_(0, slot, torch.arange(skey.numel(), device=dev))
    starts = starts[:bound]
    count, total = first.sum(), valid.sum()
    i = torch.arange(bound, device=dev)
    ends = torch.where(i + 1 < count, torch.roll(starts, -1), total)
    lengths = torch.where(i < count, ends - starts, 0)
    seg = torch.where(i < count, skey[starts] % nseg, 0)
    return Items(tokens, seg.to(torch.int32), starts.to(torch.int32), lengths.to(torch.int32))
