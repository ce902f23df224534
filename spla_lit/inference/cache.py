"""The KV cache of a :class:`~spla_lit.models.DecoderLM`: what decoding needs of every past token, per layer.

Make one with ``model.new_cache(batch_size, max_seq_len)`` and pass it to ``model(input_ids, cache=cache)``: each
call appends ``input_ids``' ``T`` tokens to every row (positions continue from the row's length) and returns
their logits; ``model.generate`` does this for you. Per layer (:class:`LayerCache`) it holds, as the layer needs:

* ``k``, ``v``: keys (after RoPE) and values ``[B, max_seq_len, Hkv, D]``, preallocated (dense and SPLA layers).
* block statistics of the keys, for the SPLA scorer (:attr:`LayerCache.block_stats`): per block its mean key and,
  by the scorer's covariance, the per-dimension variance, the covariance or its top eigenpairs. They are running
  sums updated as tokens arrive, never recomputed from the keys: the running sum (and sum of squares / of outer
  products) of each row's partial block in float32, turned into the block's moments when tokens land in it
  (eigenpairs: once, when the block completes). Stored in the cache dtype, so a decode step reads
  ``1 / block_size`` of the cache's bytes for them.
* ``state``: the linear-attention state ``S = sum_j phi(k_j) [v_j, 1]^T`` ``[B, Hkv, F, Dv + 1]`` in float32 (the
  last column is the normaliser ``z = sum_j phi(k_j)``), for SPLA layers with a residual and linear layers.

and, for the whole cache, each row's length (``lengths`` on the device; a host copy, so that nothing checks the
device). Rows may have different lengths. Bad input raises ``ValueError`` before anything is written.

For wrappers (e.g. a Hugging Face ``generate``): the cache is a plain object, ``rows(a, b)`` is a view of rows
``a:b`` sharing memory (prefill one prompt of a batch alone), ``reset()`` empties it for reuse, ``nbytes`` is its
size, and ``lengths_list()`` the rows' lengths.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from ..ops._dispatch import run_kernel, use_triton
from ..ops.utils import acc_dtype, cdiv
from ..options import COVARIANCES, check_choice, check_positive_int


@dataclass(frozen=True)
class LayerCacheSpec:
    """What one attention layer keeps in the cache (``layer.cache_spec()``).

    Attributes:
        kv_heads, head_dim, value_dim: Hkv, D, Dv of the layer.
        keys: keep every token's keys and values (dense, SPLA; a linear layer needs only its state).
        block_size: keep block statistics of the keys for a scored SPLA layer (None: none).
        covariance: the scorer's second moment: ``diag`` | ``full`` | ``lowrank``; None: the mean only (taylor1).
        rank: eigenpairs kept by ``lowrank``.
        state_dim: F, width of the residual's features: keep the linear state (None: no residual).
    """

    kv_heads: int
    head_dim: int
    value_dim: int
    keys: bool = True
    block_size: int | None = None
    covariance: str | None = None
    rank: int = 4
    state_dim: int | None = None

    def __post_init__(self) -> None:
        for name in ("kv_heads", "head_dim", "value_dim", "rank"):
            check_positive_int(name, getattr(self, name))
        if self.block_size is not None:
            check_positive_int("block_size", self.block_size)
        if self.covariance is not None:
            check_choice("covariance", self.covariance, COVARIANCES)
        if self.state_dim is not None:
            check_positive_int("state_dim", self.state_dim)


class LayerCache:
    """One layer's part of a :class:`KVCache` (see the module docstring). Tensors: ``k``, ``v``, ``state``,
    :attr:`block_stats`; the new tokens' :attr:`positions` and :attr:`empty` come from the cache."""

    def __init__(self, spec: LayerCacheSpec, parent: KVCache, *, device: torch.device, dtype: torch.dtype,
                 _tensors: dict | None = None) -> None:
        self.spec, self.parent = spec, parent
        if _tensors is not None:
            self.__dict__.update(_tensors)
            return
        B, M = parent.batch_size, parent.max_seq_len
        H, D, Dv = spec.kv_heads, spec.head_dim, spec.value_dim
        acc = acc_dtype(torch.empty(0, dtype=dtype))

        def z(*shape, dt=dtype):
            return torch.zeros(*shape, dtype=dt, device=device)

        self.k = z(B, M, H, D) if spec.keys else None
        self.v = z(B, M, H, Dv) if spec.keys else None
        self.state = z(B, H, spec.state_dim, Dv + 1, dt=acc) if spec.state_dim else None
        # Block statistics: one slot per block, plus a spare slot (index nK) that takes the writes of rows whose
        # chunk spans fewer blocks than another row's (so every write has a target and no row's slot is hit twice).
        self.mean = self.var = self.cov = self.eig_vecs = self.eig_vals = None
        self.run_sum = self.run_sq = self.run_outer = None
        if spec.block_size is not None:
            nK = cdiv(M, spec.block_size) + 1
            self.mean, self.run_sum = z(B, H, nK, D), z(B, H, D, dt=acc)
            if spec.covariance == "diag":
                self.var, self.run_sq = z(B, H, nK, D), z(B, H, D, dt=acc)
            elif spec.covariance is not None:
                self.run_outer = z(B, H, D, D, dt=acc)
                if spec.covariance == "full":
                    self.cov = z(B, H, nK, D, D)
                else:
                    r = min(spec.rank, D)
                    self.eig_vecs, self.eig_vals = z(B, H, nK, D, r), z(B, H, nK, r)

    _TENSORS = ("k", "v", "state", "mean", "var", "cov", "eig_vecs", "eig_vals", "run_sum", "run_sq", "run_outer")

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor the layer keeps, by name (None ones left out)."""
        return {n: t for n in self._TENSORS if (t := getattr(self, n)) is not None}

    def _rows(self, parent: KVCache, start: int, stop: int) -> LayerCache:
        views = {n: (t.narrow(0, start, stop - start) if t is not None else None) for n in self._TENSORS
                 for t in [getattr(self, n)]}
        return LayerCache(self.spec, parent, device=parent.device, dtype=parent.dtype, _tensors=views)

    # The step's view of the cache (set by KVCache.begin for the duration of one forward).
    @property
    def empty(self) -> bool:
        """Every row is empty: the new tokens are whole prompts, and the training ops compute them."""
        return self.parent.empty

    @property
    def positions(self) -> torch.Tensor:
        """int64 [B, T] positions of the new tokens (on the device)."""
        return self.parent.step_positions

    @property
    def uniform_step(self) -> bool:
        """One new token per row, every row as long and the cache read up to exactly that length (eager mode):
        then every cached key is visible to every new token, no mask needed."""
        return self.parent.uniform_step

    @property
    def visible_len(self) -> int:
        """Cache rows a step needs to look at: the longest row's end (the whole cache in static mode)."""
        return self.parent.visible_len

    @property
    def block_stats(self) -> tuple | None:
        """``(mean [B, Hkv, nK, D], second)`` as ``ops.decode_block_scores`` takes them (None without statistics),
        ``second`` the variance, the covariance, ``(U, lam)`` or None by the scorer's covariance, over the first
        ``cdiv(visible_len, block_size)`` blocks."""
        if self.mean is None:
            return None
        nK = cdiv(self.visible_len, self.spec.block_size)
        second = {"diag": self.var, "full": self.cov}.get(self.spec.covariance)
        if self.spec.covariance == "lowrank":
            second = (self.eig_vecs[:, :, :nK], self.eig_vals[:, :, :nK])
        elif second is not None:
            second = second[:, :, :nK]
        return self.mean[:, :, :nK], second

    def keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(k, v)`` up to :attr:`visible_len`."""
        n = self.visible_len
        return self.k[:, :n], self.v[:, :n]

    # ------------------------------------------------------------------------------------------- updates

    def append(self, k: torch.Tensor | None, v: torch.Tensor, phi_k: torch.Tensor | None = None, *,
               impl: str = "auto") -> None:
        """Write the new tokens (k, v [B, T, Hkv, D | Dv], their features phi_k [B, T, Hkv, F] for the state) at
        :attr:`positions` and update the statistics and the state. Called once per layer and forward. One token
        per row on CUDA: one Triton kernel (``spla_kernels.decode_append``) does it all."""
        pos = self.positions
        if pos.shape[1] == 1 and self.run_outer is None and use_triton(impl, "decode_append", v):
            done = run_kernel(impl, "decode_append", k, v.contiguous(), phi_k, pos, k_cache=self.k, v_cache=self.v,
                              block_size=self.spec.block_size, mean=self.mean, var=self.var, run_sum=self.run_sum,
                              run_sq=self.run_sq, state=self.state)
            if done:
                return
        rows = torch.arange(pos.shape[0], device=pos.device)[:, None]
        if self.k is not None:
            self.k[rows, pos] = k.to(self.k.dtype)
            self.v[rows, pos] = v.to(self.v.dtype)
        if self.mean is not None:
            self._update_stats(k, pos)
        if self.state is not None:
            dt = self.state.dtype
            v1 = torch.cat([v.to(dt), torch.ones_like(v[..., :1], dtype=dt)], -1)
            self.state += torch.einsum("bthf,bthe->bhfe", phi_k.to(dt), v1)

    def _update_stats(self, k: torch.Tensor, pos: torch.Tensor) -> None:
        """Running block sums -> the moments of every block the new tokens land in (see the module docstring)."""
        bs, cov = self.spec.block_size, self.spec.covariance
        B, T, H, D = k.shape
        acc = self.run_sum.dtype
        spare = self.mean.shape[2] - 1
        start, host_start = self.parent.lengths, self.parent.host_lengths
        R = int(((host_start % bs + T - 1) // bs).max()) + 1  # blocks a row's chunk touches (host arithmetic)
        blk0 = start // bs
        # The chunk laid out in its blocks: X [B, R, bs, H, D], zeros where a block has no new token.
        X = torch.zeros(B, R * bs, H, D, dtype=acc, device=k.device)
        X[torch.arange(B, device=k.device)[:, None], pos - blk0[:, None] * bs] = k.to(acc)
        X = X.view(B, R, bs, H, D).permute(0, 3, 1, 2, 4)  # [B, H, R, bs, D]
        first = (blk0[:, None] + torch.arange(R, device=k.device)) * bs  # [B, R] first token of each block
        end = (start + T)[:, None]
        count = (torch.minimum(end, first + bs) - first).clamp(min=1).to(acc)[:, None, :, None]  # [B, 1, R, 1]
        slot = torch.where(first < end, blk0[:, None] + torch.arange(R, device=k.device), spare)  # [B, R]
        complete = first + bs <= end  # [B, R]
        last = ((start + T - 1) // bs - blk0)[:, None]  # [B, 1] the block of each row's last new token

        def carry(sums: torch.Tensor) -> torch.Tensor:
            """The running sums of the block holding each row's last token, zero once that block is complete."""
            idx = last.view(B, 1, 1, *([1] * (sums.dim() - 3))).expand(B, H, 1, *sums.shape[3:])
            keep = ~complete.gather(1, last).view(B, *([1] * (sums.dim() - 2)))
            return torch.where(keep, sums.gather(2, idx).squeeze(2), 0.0)

        def store(dst: torch.Tensor, value: torch.Tensor, slots: torch.Tensor) -> None:
            idx = slots.view(B, 1, R, *([1] * (value.dim() - 3))).expand_as(value)
            dst.scatter_(2, idx, value.to(dst.dtype))

        sums = X.sum(3)
        sums[:, :, 0] += self.run_sum
        mean = sums / count
        store(self.mean, mean, slot)
        self.run_sum.copy_(carry(sums))
        if cov == "diag":
            sq = X.square().sum(3)
            sq[:, :, 0] += self.run_sq
            store(self.var, (sq / count - mean.square()).clamp_min(0), slot)
            self.run_sq.copy_(carry(sq))
        elif cov is not None:
            outer = X.transpose(-1, -2) @ X  # [B, H, R, D, D]
            outer[:, :, 0] += self.run_outer
            second = outer / count[..., None] - mean[..., :, None] * mean[..., None, :]
            if cov == "full":
                store(self.cov, second, slot)
            elif bool(((host_start % bs + T) >= bs).any()):  # a block completes: its eigenpairs, once (host test)
                lam, vecs = torch.linalg.eigh(second)
                r = self.eig_vals.shape[-1]
                done = torch.where(complete, slot, spare)
                store(self.eig_vecs, vecs[..., -r:], done)
                store(self.eig_vals, lam[..., -r:].clamp_min(0), done)
            self.run_outer.copy_(carry(outer))


class KVCache:
    """Decoding state of a :class:`~spla_lit.models.DecoderLM` for ``batch_size`` rows of up to ``max_seq_len``
    tokens (``model.new_cache``; see the module docstring). ``layers[i]`` is layer i's :class:`LayerCache`."""

    def __init__(self, specs: list[LayerCacheSpec], batch_size: int, max_seq_len: int, *,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                 owner: torch.nn.Module | None = None, _view_of: tuple | None = None) -> None:
        self.specs = tuple(specs)
        self._owner = weakref.ref(owner) if owner is not None else None
        self.broken = False
        self.static = False  # CUDA-graph mode: shapes never depend on the rows' lengths
        self.step_positions: torch.Tensor | None = None
        self.visible_len = 0
        self.uniform_step = False
        if _view_of is not None:
            base, start, stop = _view_of
            self.batch_size, self.max_seq_len = stop - start, base.max_seq_len
            self.device, self.dtype, self._owner = base.device, base.dtype, base._owner
            self.lengths = base.lengths.narrow(0, start, stop - start)
            self.host_lengths = base.host_lengths.narrow(0, start, stop - start)
            self._base = base
            self.layers = [layer._rows(self, start, stop) for layer in base.layers]
            return
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.max_seq_len = check_positive_int("max_seq_len", max_seq_len)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.device, self.dtype = torch.device(device if device is not None else "cpu"), dtype
        self._base = None
        self.lengths = torch.zeros(batch_size, dtype=torch.int64, device=self.device)
        self.host_lengths = torch.zeros(batch_size, dtype=torch.int64)  # the host's copy: no device sync to read
        self.layers = [LayerCache(s, self, device=self.device, dtype=dtype) for s in self.specs]

    # -------------------------------------------------------------------------------------------- queries

    @property
    def empty(self) -> bool:
        """Whether every row is empty."""
        return int(self.host_lengths.max()) == 0

    def lengths_list(self) -> list[int]:
        """Each row's length (from the host copy: no device sync)."""
        return [int(n) for n in self.host_lengths]

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor of the cache."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.tensors().values())

    def rows(self, start: int, stop: int) -> KVCache:
        """A view of rows ``start:stop`` that shares this cache's memory (a forward through it updates them)."""
        if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start < stop <= self.batch_size):
            raise ValueError(f"rows: need 0 <= start < stop <= batch_size = {self.batch_size}, got {start}:{stop}")
        return KVCache(list(self.specs), 0, 0, _view_of=(self, start, stop))

    def reset(self) -> None:
        """Empty every row (lengths to zero; the running sums and states to zero) to reuse the memory."""
        for layer in self.layers:
            for name, t in layer.tensors().items():
                if name in ("state", "run_sum", "run_sq", "run_outer"):
                    t.zero_()
        self.lengths.zero_()
        self.host_lengths.zero_()
        self.broken = False

    # ---------------------------------------------------------------------------------------- a forward

    def check(self, model: torch.nn.Module, input_ids: object) -> None:
        """``ValueError`` naming the problem if ``model(input_ids, cache=self)`` cannot run; changes nothing."""
        base = self._base or self
        if base.broken or self.broken:
            raise ValueError("cache: a forward through this cache failed part-way, so its layers disagree; make a new "
                             "cache (model.new_cache) or reset() it")
        owner = self._owner() if self._owner is not None else None
        if owner is not model or tuple(getattr(model, "cache_specs", lambda: ())()) != self.specs:
            raise ValueError("cache: this cache was made for another model (use the model's own new_cache)")
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
            got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be an integer [B, T] tensor with a cache, got {got}")
        B, T = input_ids.shape
        if self.batch_size != B:
            raise ValueError(f"input_ids has batch size {B} but the cache holds {self.batch_size} rows")
        if T < 1:
            raise ValueError("input_ids has no tokens (T = 0)")
        if input_ids.device != self.device:
            raise ValueError(f"input_ids is on {input_ids.device} but the cache is on {self.device}")
        longest = int(self.host_lengths.max()) + T
        if longest > self.max_seq_len:
            row = int(self.host_lengths.argmax())
            raise ValueError(f"input_ids: row {row} would reach {longest} tokens, past the cache's max_seq_len "
                             f"= {self.max_seq_len}")

    def begin(self, T: int) -> torch.Tensor:
        """Start a forward of T new tokens per row: sets and returns their positions int64 [B, T]."""
        self.step_positions = self.lengths[:, None] + torch.arange(T, device=self.device)
        self.visible_len = self.max_seq_len if self.static else int(self.host_lengths.max()) + T
        self.uniform_step = T == 1 and not self.static and int(self.host_lengths.min()) + T == self.visible_len
        return self.step_positions

    def advance(self, T: int) -> None:
        """End a forward: every row is T tokens longer."""
        self.lengths += T
        self.host_lengths += T
        self.step_positions = None

    def invalidate(self) -> None:
        """Mark the cache unusable (a forward failed after some layers were updated)."""
        self.broken = True
        if self._base is not None:
            self._base.broken = True
