"""The kernels' tile configs (``spla_kernels.config``): validation, GPU classes and the per-device table.

That every table entry computes the right result is tested with the kernels (``test_tile_configs_agree`` and
friends in the other modules); that it fits a class's shared memory, by ``benchmarks/compile_tiles.py``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import spla_kernels
from spla_kernels import config as C


@pytest.mark.parametrize(("cls", "field", "value", "match"), [
    (C.SparseConfig, "fwd_rows", 0, "SparseConfig.fwd_rows must be an integer >= 1"),
    (C.SparseConfig, "window", 2.5, "SparseConfig.window"),
    (C.SparseConfig, "dkv_warps", 3, "SparseConfig.dkv_warps must be a power of two"),
    (C.SparseConfig, "fwd_warps", 32, "SparseConfig.fwd_warps must be <= 16"),
    (C.SelectConfig, "rows", 96, "SelectConfig.rows must be a power of two"),
    (C.SelectConfig, "quad_split", 1, "SelectConfig.quad_split must be True or False"),
    (C.SelectConfig, "stages", True, "SelectConfig.stages must be an integer"),
    (C.LinearConfig, "scan_block", 100, "LinearConfig.scan_block must be a power of two"),
    (C.LinearConfig, "bwd_split", None, "LinearConfig.bwd_split must be True or False"),
])
def test_bad_fields_are_named(cls, field, value, match):
    with pytest.raises(ValueError, match=match):
        cls(**{field: value})


def test_configs_are_frozen_values():
    cfg = C.SparseConfig(window=None)  # the whole sequence as one dK/dV window is allowed
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.fwd_rows = 32
    assert dataclasses.replace(cfg, fwd_rows=32).fwd_rows == 32 and cfg == C.SparseConfig(window=None)
    # The package exports the classes (lazily, like the entry points).
    assert spla_kernels.SparseConfig is C.SparseConfig and spla_kernels.LinearConfig is C.LinearConfig
    assert spla_kernels.SelectConfig is C.SelectConfig


@pytest.mark.parametrize(("capability", "arch"), [((9, 0), "sm90"), ((8, 0), "sm80"), ((8, 7), "sm80"),
                                                  ((8, 6), "sm89"), ((8, 9), "sm89"), ((12, 0), "sm89"),
                                                  ((10, 0), "default"), ((7, 5), "default")])
def test_gpu_classes(monkeypatch, capability, arch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    C._cuda_arch.cache_clear()
    try:
        assert C.arch_of(torch.device("cuda", 0)) == arch
        assert C.arch_of("cuda:1") == arch
    finally:
        C._cuda_arch.cache_clear()


def test_cpu_uses_the_measured_class():
    assert C.arch_of("cpu") == "sm90"


def test_table_covers_every_class_and_keeps_the_measured_tiles():
    for table, cls in ((C._SPARSE, C.SparseConfig), (C._SELECT, C.SelectConfig), (C._LINEAR, C.LinearConfig)):
        assert set(table) == {(arch, wide) for arch in C.ARCHS for wide in (False, True)}
        assert set(C.ARCHS) == set(C.SHARED_MEMORY)
        assert all(cfg is None or isinstance(cfg, cls) for cfg in table.values())
        assert table["default", False] == table["sm89", False] and table["default", True] == table["sm89", True]
    bf16 = torch.bfloat16
    # sm90: the configurations the H100 tables were measured with (docs/kernels.md).
    assert C.sparse_config("sm90", fused=True, dtype=bf16, dim=128, block_size=64) == C.SparseConfig(
        fwd_rows=16, dq_rows=16, dkv_rows=16, window=2048, fwd_warps=4, fwd_stages=2, dq_warps=4, dq_stages=2,
        dkv_warps=4, dkv_stages=2)
    assert C.select_config("sm90", dtype=bf16, head_dim=128) == C.SelectConfig(
        rows=128, blocks_per_step=32, warps=8, stages=3, quad_split=True)
    assert C.linear_config("sm90", dtype=bf16) == C.LinearConfig(
        out_rows=64, out_warps=4, out_stages=3, dkdv_rows=64, dkdv_warps=8, dkdv_stages=2, super_target=256,
        scan_chunks=16, scan_block=256, epilogue_rows=32, bwd_split=True)


def _entry(lookup, **kw):
    """The table entry a lookup returns, None where it declines."""
    try:
        return lookup(**kw)
    except NotImplementedError:
        return None


@pytest.mark.parametrize("arch", C.ARCHS)
def test_lookup_keys(arch):
    # What makes an entry wide, per family; float16 counts as wide only where the kernel computes in float32.
    bf16, f16, f32 = torch.bfloat16, torch.float16, torch.float32
    sp, se, li = C._SPARSE, C._SELECT, C._LINEAR
    assert _entry(C.sparse_config, arch=arch, fused=False, dtype=bf16, dim=128, block_size=64) is sp[arch, False]
    assert _entry(C.sparse_config, arch=arch, fused=True, dtype=f16, dim=128, block_size=64) is sp[arch, False]
    for kw in (dict(dtype=f32, dim=128, block_size=64), dict(dtype=bf16, dim=129, block_size=64),
               dict(dtype=bf16, dim=128, block_size=128)):
        assert _entry(C.sparse_config, arch=arch, fused=True, **kw) is sp[arch, True]
    assert _entry(C.select_config, arch=arch, dtype=bf16, head_dim=128) is se[arch, False]
    for dtype, d in ((f16, 128), (f32, 64), (bf16, 256)):
        assert _entry(C.select_config, arch=arch, dtype=dtype, head_dim=d) is se[arch, True]
    assert _entry(C.linear_config, arch=arch, dtype=bf16) is li[arch, False]
    assert _entry(C.linear_config, arch=arch, dtype=f16) is _entry(C.linear_config, arch=arch, dtype=f32)
    assert _entry(C.linear_config, arch=arch, dtype=f32) is li[arch, True]


def test_classes_without_tiles_decline():
    with pytest.raises(NotImplementedError, match="linear-attention tiles .* sm89"):
        C.linear_config("sm89", dtype=torch.bfloat16)
    with pytest.raises(NotImplementedError, match="sparse-attention tiles .* default"):
        C.sparse_config("default", fused=True, dtype=torch.float32, dim=128, block_size=64)
    assert C.sparse_config("sm89", fused=True, dtype=torch.bfloat16, dim=128, block_size=64) == C.SparseConfig()


def test_wide_entries_are_never_larger():
    # A wide entry never has more stages or rows than the narrow one of its class (wider tiles, same memory).
    for arch in C.ARCHS:
        for table, names in ((C._SPARSE, ("fwd_rows", "dq_rows", "dkv_rows", "fwd_stages", "dq_stages", "dkv_stages")),
                             (C._SELECT, ("rows", "blocks_per_step", "stages")),
                             (C._LINEAR, ("out_rows", "out_stages", "dkdv_rows", "dkdv_stages"))):
            narrow, wide = table[arch, False], table[arch, True]
            if narrow is None or wide is None:
                assert wide is None, (arch, narrow)  # a class without narrow tiles has no wide ones either
                continue
            assert all(getattr(wide, f) <= getattr(narrow, f) for f in names), (arch, wide, narrow)
