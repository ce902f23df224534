"""Scale-out on the CPU (gloo): DDP and FSDP2 over 2 processes match one process with the same global batch;
sharded checkpoints resume on another number of processes and consolidate into a normal file; a Hydra
multirun launches each distributed job once, in its own folder; torch.compile and its graph-break report;
the FLOP counts behind MFU."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from hydra_utils import ROOT, TINY, make_cfg
from omegaconf import OmegaConf

from spla_lit.training import flops
from spla_lit.training.callbacks import graph_breaks
from spla_lit.training.consolidate import consolidate, is_sharded_checkpoint
from spla_lit.training.consolidate import main as consolidate_main
from spla_lit.training.run import train

# 2 processes x batch 1 vs 1 process x batch 2: the data module shards indices with stride 2, so both see
# samples {2s, 2s + 1} at step s.
TWO_PROCS = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true", "data.batch_size=1"]
ONE_PROC_FSDP = ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.precision=32-true"]


def _scalars(run_dir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    state = consolidate(ckpt) if ckpt.is_dir() else torch.load(ckpt, map_location="cpu", weights_only=False)
    return {k: v for k, v in state["state_dict"].items() if k.startswith("net.")}


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), rtol=1e-5, atol=1e-6, msg=k)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One process, batch 2, 4 steps, checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("reference")
    metrics = train(make_cfg(["data.batch_size=2"], out))
    assert "train/tflops_per_device" in metrics and "train/mfu" not in metrics  # no known peak on the CPU
    return out


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """`python train.py -m trainer=ddp,fsdp` on 2 CPU processes each: one sweep, two distributed jobs."""
    logs = tmp_path_factory.mktemp("logs")
    proc = subprocess.run([sys.executable, "train.py", "-m", "trainer=ddp,fsdp", *TINY, *TWO_PROCS,
                           f"paths.log_dir={logs}"], cwd=ROOT, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("Launching 2 jobs") + proc.stderr.count("Launching 2 jobs") == 1  # no child sweeps
    (sweep_dir,) = (logs / "train" / "multiruns").iterdir()
    assert not (logs / "train" / "runs").exists()  # children ran in the job's folder, not a run folder of their own
    return sweep_dir


def test_multirun_launches_each_distributed_job_once_in_its_own_folder(sweep):
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0_spla_taylor2_topk_subtract", "1_spla_taylor2_topk_subtract"]
    for job, trainer in zip(jobs, ["ddp", "fsdp"]):
        assert f"trainer={trainer}" in OmegaConf.load(sweep / job / ".hydra" / "overrides.yaml")
        assert (sweep / job / "train_rank1.log").exists()  # rank 1 ran this very job, here
        assert not list((sweep / job).rglob("multirun.yaml"))


def test_ddp_and_fsdp_match_one_process_with_the_same_global_batch(sweep, reference):
    ref_loss = _scalars(reference, "train/loss")
    ref_weights = _weights(reference / "checkpoints" / "last.ckpt")
    for job in ("0_spla_taylor2_topk_subtract", "1_spla_taylor2_topk_subtract"):
        loss = _scalars(sweep / job, "train/loss")  # the mean over ranks: the global batch's loss
        assert sorted(loss) == sorted(ref_loss) == [0, 1, 2, 3]
        for step in ref_loss:
            assert loss[step] == pytest.approx(ref_loss[step], rel=1e-5), (job, step)
        # the clipping norm: FSDP's sharded gradients reduced over their mesh, DDP's all-reduced ones local
        norm, ref_norm = _scalars(sweep / job, "train/grad_norm"), _scalars(reference, "train/grad_norm")
        assert sorted(norm) == sorted(ref_norm) == [0, 1, 2, 3]
        for step in ref_norm:
            assert norm[step] == pytest.approx(ref_norm[step], rel=1e-5), (job, step)
        _assert_same_weights(_weights(sweep / job / "checkpoints" / "last.ckpt"), ref_weights)
        assert _scalars(sweep / job, "train/tokens_per_s")
    # DDP writes one file (atomic plugin), FSDP a folder with one shard per rank
    assert (sweep / "0_spla_taylor2_topk_subtract" / "checkpoints" / "last.ckpt").is_file()
    sharded = sweep / "1_spla_taylor2_topk_subtract" / "checkpoints" / "step000002.ckpt"
    assert is_sharded_checkpoint(sharded) and len(list(sharded.glob("*.distcp"))) == 2
    assert not list(sharded.parent.glob(".*"))  # no partial or old folders left behind


def test_sharded_checkpoint_resumes_on_one_process_at_the_exact_step(sweep, reference, tmp_path):
    ckpt = sweep / "1_spla_taylor2_topk_subtract" / "checkpoints" / "step000002.ckpt"
    train(make_cfg([*ONE_PROC_FSDP, "data.batch_size=2", f"ckpt_path={ckpt}"], tmp_path))
    assert not torch.distributed.is_initialized()  # the job cleaned up its process group
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt" / "meta.pt", weights_only=True)["global_step"] == 4
    _assert_same_weights(_weights(tmp_path / "checkpoints" / "last.ckpt"),
                         _weights(reference / "checkpoints" / "last.ckpt"))


def test_consolidated_checkpoint_loads_and_resumes_in_the_normal_path(sweep, reference, tmp_path):
    src = sweep / "1_spla_taylor2_topk_subtract" / "checkpoints" / "step000002.ckpt"
    out = tmp_path / "step2.ckpt"
    assert consolidate_main([str(src), str(out)]) == 0
    ckpt = torch.load(out, map_location="cpu", weights_only=True)  # plain tensors and containers only
    ref = torch.load(reference / "checkpoints" / "step000002.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2 and ckpt["spla_config"]["model"] == ref["spla_config"]["model"]
    net = instantiate(OmegaConf.create(ckpt["spla_config"]["model"]))  # as eval rebuilds it
    net.load_state_dict({k[4:]: v for k, v in ckpt["state_dict"].items()})
    _assert_same_weights(_weights(out), _weights(reference / "checkpoints" / "step000002.ckpt"))
    # and it resumes at the exact step on one device, without any distributed strategy
    train(make_cfg(["data.batch_size=2", f"ckpt_path={out}"], tmp_path / "resumed"))
    _assert_same_weights(_weights(tmp_path / "resumed" / "checkpoints" / "last.ckpt"),
                         _weights(reference / "checkpoints" / "last.ckpt"))


def test_resume_with_another_global_batch_warns(reference, tmp_path):
    ckpt = reference / "checkpoints" / "step000002.ckpt"
    with pytest.warns(UserWarning, match="samples per optimizer step"):
        train(make_cfg(["data.batch_size=1", "trainer.max_steps=3", f"ckpt_path={ckpt}"], tmp_path))


COMPILE = ["trainer.compile=true", "trainer.compile_backend=aot_eager", "trainer.max_steps=2",
           "trainer.val_check_interval=2", "model.n_layers=1"]


def test_compile_trains_like_eager_and_reports_graph_breaks(tmp_path):
    eager = train(make_cfg(["model=dense", "trainer.max_steps=2", "trainer.val_check_interval=2",
                            "model.n_layers=1"], tmp_path / "eager"))
    # the dense reference path must compile whole: fullgraph makes any break an error
    compiled = train(make_cfg(["model=dense", "trainer.compile_fullgraph=true", "model.activation_checkpointing=true",
                               *COMPILE], tmp_path / "dense"))
    assert compiled["compile/graph_breaks"] == 0
    assert compiled["train/loss"] == pytest.approx(eager["train/loss"], rel=1e-4)
    _assert_same_weights(_weights(tmp_path / "dense" / "checkpoints" / "last.ckpt"),  # parameter names unchanged
                         _weights(tmp_path / "eager" / "checkpoints" / "last.ckpt"))
    # the SPLA reference path breaks (data-dependent sizes in the selection bookkeeping): reported, not silent
    with pytest.warns(UserWarning, match="graph breaks"):
        metrics = train(make_cfg([*COMPILE], tmp_path / "spla"))
    assert metrics["compile/graph_breaks"] > 0
    # with fullgraph those sizes are traced as unbacked symbols (no Python branch depends on them since the
    # topk >= forced rule moved into Selection): the block compiles whole and trains the same
    strict = train(make_cfg(["trainer.compile_fullgraph=true", *COMPILE], tmp_path / "strict"))
    assert strict["compile/graph_breaks"] == 0
    assert strict["train/loss"] == pytest.approx(metrics["train/loss"], rel=1e-4)


def test_linear_attention_reference_compiles_whole_with_inductor(tmp_path):
    # Inductor, the default backend (aot_eager hits a PyTorch AOTAutograd view bug on this model's backward).
    metrics = train(make_cfg(["model=linear", "trainer.compile_fullgraph=true", *COMPILE,
                              "trainer.compile_backend=inductor"], tmp_path))
    assert metrics["compile/graph_breaks"] == 0


def test_flop_counts_follow_the_attention_variant():
    n = 1024
    models = {"dense": ["model=dense"], "sparse": ["model=spla", "rla=none"], "spla": ["model=spla"],
              "linear": ["model=linear"]}
    cfgs = {name: make_cfg([*models[name], "sparse.block_size=64", "sparse.topk=4", "model.d_model=64",
                            "model.n_heads=2", "model.n_kv_heads=1"])
            for name in models}
    nets = {name: instantiate(cfg.model) for name, cfg in cfgs.items()}
    count = {name: flops.training_flops(net, n) for name, net in nets.items()}
    hq, d = 2, 32
    # dense causal: N(N+1)/2 pairs, QK^T and PV, forward + backward
    assert count["dense"].attention == 3 * 4 * d * (n * (n + 1) // 2) * hq * 2  # 2 layers
    # block-sparse: about N * topk * block_size pairs, less in the causal prefix
    pairs = flops.sparse_pairs(n, 64, 4)
    assert n * 3 * 64 < pairs < n * 4 * 64
    assert count["sparse"].attention == 3 * 4 * d * pairs * hq * 2
    assert flops.sparse_pairs(n, 64, n) == n * (n + 1) // 2  # every block selected: dense
    # SPLA adds the linear scan and the selected-linear term; linear attention is the scan alone
    scan = 2 * d * (d + 1) * n * (hq + 1)  # state update per KV head, read-out per query head
    selected = 2 * (2 * d + 1) * pairs * hq
    assert count["spla"].attention == count["sparse"].attention + 3 * (scan + selected) * 2
    assert count["linear"].attention == 3 * scan * 2
    assert count["linear"].scorer == 0 < count["spla"].scorer
    # matmuls: 6 x weights x tokens, the same for every variant but SPLA's gate
    assert count["dense"].matmul == count["linear"].matmul == count["sparse"].matmul < count["spla"].matmul
    weights = sum(m.weight.numel() for m in nets["dense"].modules() if isinstance(m, torch.nn.Linear))
    assert count["dense"].matmul == 6 * weights * n
    assert flops.peak_flops(torch.device("cpu")) is None


def test_compile_runs_the_triton_ops_outside_the_graphs(tmp_path):
    """The SPLA model on the Triton kernels (interpreted on the CPU) compiles: the kernels run eagerly between
    the compiled graphs (not traced: Inductor would recompile them), the breaks are reported, and the
    training matches the eager run."""
    small = ["impl=triton", "data.seq_len=128", "data.batch_size=1", "trainer.limit_val_batches=0", "model.n_layers=1",
             "trainer.max_steps=1", "trainer.val_check_interval=1"]
    eager = train(make_cfg(small, tmp_path / "eager"))
    before = graph_breaks()  # dynamo's counters are per process
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = train(make_cfg([*COMPILE, *small], tmp_path / "compiled"))
    new = [reason for reason, count in graph_breaks().items() if count > before.get(reason, 0)]
    assert compiled["compile/graph_breaks"] > 0  # counted ...
    assert not [w for w in caught if "graph breaks" in str(w.message)]  # ... but expected: no warning
    assert new and all("run_kernel" in reason for reason in new)
    assert compiled["train/loss"] == pytest.approx(eager["train/loss"], rel=1e-4)
