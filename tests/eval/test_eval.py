"""Long-context evaluation: eval.py, fidelity metrics, perplexity buckets, sweep collection, ablation configs."""

from __future__ import annotations

import json
import math
import runpy
import subprocess
import sys
from functools import partial

import pytest
import torch
from hydra.errors import ConfigCompositionException
from hydra_utils import ROOT, make_cfg
from omegaconf import OmegaConf

from spla_lit import ops
from spla_lit.config import ConfigError
from spla_lit.data import VAL_SEED_OFFSET
from spla_lit.eval.capture import capture_spla
from spla_lit.eval.fidelity import (
    AttentionMassShare,
    BlockRecall,
    LayerFidelity,
    ResidualError,
    oracle_selection,
)
from spla_lit.eval.loading import apply_overrides, load_model
from spla_lit.eval.perplexity import PositionBucketLoss, bucket_edges, token_losses
from spla_lit.eval.ruler import check_disjoint, heldout_seed, ruler_seed
from spla_lit.eval.runner import evaluate
from spla_lit.eval.sweep import collect, eval_config, find_jobs
from spla_lit.layers import BlockScorer, BlockSparseAttention, ResidualLinearAttention, SPLAAttention
from spla_lit.options import Selection
from spla_lit.training.run import train

TASKS = "[niah_single,variable_tracking]"
FAST_EVAL = ["lengths=[64,128]", "num_samples=2", f"tasks={TASKS}", "perplexity.num_samples=2",
             "perplexity.num_buckets=4", "fidelity.num_samples=1", "device=cpu"]


@pytest.fixture(scope="module")
def spla_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("spla_run")
    train(make_cfg(["trainer.max_steps=2", "trainer.val_check_interval=2"], out))
    return out / "checkpoints" / "last.ckpt"


# ----------------------------------------------------------------------------------------------- eval.py


@pytest.mark.slow
def test_eval_cli_writes_json_markdown_and_plot(spla_ckpt, tmp_path):
    proc = subprocess.run([sys.executable, "eval.py", f"ckpt_path={spla_ckpt}", f"output_dir={tmp_path}", *FAST_EVAL,
                           f"paths.log_dir={tmp_path / 'logs'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) >= {"model", "eval", "ruler", "perplexity", "fidelity", "timing_s"}
    assert results["model"]["label"] == "spla-taylor2-k3" and results["model"]["global_step"] == 2
    assert set(results["ruler"]["per_task"]) == {"64", "128"}
    assert set(results["ruler"]["per_task"]["64"]) == {"niah_single", "variable_tracking"}
    for n, scores in results["ruler"]["per_task"].items():  # RULER: the length's score is the mean over tasks
        assert results["ruler"]["average"][n] == pytest.approx(sum(scores.values()) / len(scores))
    assert results["ruler"]["seed"] == ruler_seed(0)
    assert [(b["start"], b["end"]) for b in results["perplexity"]["buckets"]] == [(0, 32), (32, 64), (64, 96),
                                                                                 (96, 128)]
    assert set(results["fidelity"]["layers"]) == {"0", "1"}
    assert 0 <= results["fidelity"]["mean"]["recall"] <= 1 and 0 < results["fidelity"]["mean"]["mass_share"] <= 1
    md = (tmp_path / "results.md").read_text()
    assert "| task | 64 | 128 |" in md and "| **average** |" in md and "residual err" in md
    assert (tmp_path / "accuracy.png").stat().st_size > 1000


def test_eval_override_changes_selection_not_weights(spla_ckpt):
    base = load_model(spla_ckpt)
    other = load_model(spla_ckpt, {"sparse": {"topk": 5}, "scorer": {"method": "oracle"}, "rla": {"mode": "none"}})
    assert other.overrides == {"sparse.topk": 5, "scorer.method": "oracle", "rla.mode": "none"}
    attn = other.net.layers[0].attn
    assert attn.sparse.topk == 5 and attn.scorer.method == "oracle" and attn.rla is None
    assert base.net.layers[0].attn.sparse.topk == 3
    torch.testing.assert_close(other.net.layers[1].attn.wq.weight, base.net.layers[1].attn.wq.weight)


def test_dense_checkpoint_read_as_block_sparse(tmp_path):
    # override.model.attention=spla: the dense weights through SPLA's selection (no residual). With every block
    # selected it is the dense model exactly; with a few blocks it is a different function of the same weights.
    train(make_cfg(["model=dense", "trainer.max_steps=2", "trainer.val_check_interval=2"], tmp_path))
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    dense = load_model(ckpt).net
    every = load_model(ckpt, {"model": {"attention": "spla"}, "sparse": {"topk": 8}, "scorer": {"method": "oracle"}})
    few = load_model(ckpt, {"model": {"attention": "spla"}, "scorer": {"method": "taylor1"}})
    assert every.overrides["model.attention"] == "spla"
    attn = few.net.layers[0].attn
    assert type(attn).__name__ == "SPLAAttention" and attn.rla is None and attn.scorer.method == "taylor1"
    assert attn.sparse.topk == 3  # the run's sparse group (TINY)
    torch.testing.assert_close(few.net.layers[1].attn.wk.weight, dense.layers[1].attn.wk.weight)
    ids = torch.randint(0, 128, (2, 128), generator=torch.Generator().manual_seed(0))  # 8 blocks of 16
    with torch.no_grad():
        ref = dense(ids)
        torch.testing.assert_close(every.net(ids), ref, rtol=1e-4, atol=1e-4)
        assert (few.net(ids) - ref).abs().max() > 1e-3
    with pytest.raises(ConfigError, match=r"^override\.model\.attention: only 'spla'"):
        load_model(ckpt, {"model": {"attention": "linear"}})


def test_bad_eval_overrides_name_the_key(spla_ckpt, tmp_path):
    with pytest.raises(ConfigCompositionException, match=r"override\.sparse\.foo"):
        eval_config([f"ckpt_path={spla_ckpt}", "override.sparse.foo=1"])
    cfg = OmegaConf.create(torch.load(spla_ckpt, weights_only=True)["spla_config"])
    with pytest.raises(ConfigError, match=r"^override\.sparse\.foo: unknown key"):
        apply_overrides(cfg, {"sparse": {"foo": 1}})  # what `+override.sparse.foo=1` reaches
    with pytest.raises(ConfigError, match=r"^override\.sparse\.topk: must be an integer >= 1, got 0"):
        evaluate(eval_config([f"ckpt_path={spla_ckpt}", f"output_dir={tmp_path}", "override.sparse.topk=0"]))
    with pytest.raises(ConfigError, match=r"^override\.scorer\.method: unknown value 'foo'"):
        apply_overrides(cfg, {"scorer": {"method": "foo"}})
    with pytest.raises(ConfigError, match=r"^override\.sparse\.topk: the checkpoint's model uses DenseAttention"):
        apply_overrides(make_cfg(["model=dense"]), {"sparse": {"topk": 8}})
    with pytest.raises(ConfigError, match=r"^override\.model\.attention: only a dense checkpoint"):
        apply_overrides(cfg, {"model": {"attention": "spla"}})
    with pytest.raises(ConfigError, match=r"^tasks: unknown task 'foo'"):
        evaluate(eval_config([f"ckpt_path={spla_ckpt}", f"output_dir={tmp_path}", "tasks=[foo]"]))
    with pytest.raises(ConfigError, match=r"^ckpt_path: no checkpoint"):
        evaluate(eval_config([f"ckpt_path={tmp_path / 'missing.ckpt'}", f"output_dir={tmp_path}"]))


def test_eval_seed_streams_are_disjoint_from_training():
    assert len({ruler_seed(0), heldout_seed(0), ruler_seed(1), 1234, 1234 + VAL_SEED_OFFSET}) == 5
    check_disjoint(0, 1234)
    with pytest.raises(ConfigError, match="^seed:"):
        check_disjoint(0, ruler_seed(0))
    with pytest.raises(ConfigError, match="^seed:"):
        check_disjoint(0, heldout_seed(0) - VAL_SEED_OFFSET)


# ----------------------------------------------------------------------------------------------- fidelity


def _layer(topk: int, method: str = "taylor2", rla: bool = True, block_size: int = 8) -> SPLAAttention:
    torch.manual_seed(0)
    return SPLAAttention(32, 4, 2, scorer=partial(BlockScorer, method=method),
                         sparse=partial(BlockSparseAttention, block_size=block_size, topk=topk),
                         rla=partial(ResidualLinearAttention) if rla else None).eval()


def _fidelity(layer: SPLAAttention, n: int = 48) -> dict[str, float]:
    x = torch.randn(2, n, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), capture_spla(layer) as captures:
        layer(x)
    (cap,) = captures
    metric = LayerFidelity()
    metric.update(cap)
    return metric.compute()


def test_fidelity_is_perfect_when_topk_covers_every_block():
    f = _fidelity(_layer(topk=6))  # 48 tokens = 6 blocks
    assert f["recall"] == 1.0
    assert f["mass_share"] == pytest.approx(1.0, abs=1e-9) and f["oracle_mass_share"] == pytest.approx(1.0, abs=1e-9)
    assert f["sparse_err"] < 1e-5 and f["layer_err"] < 1e-5
    assert math.isnan(f["residual_err"])  # no tail left to estimate


def test_oracle_scorer_has_recall_one_and_the_oracle_mass():
    f = _fidelity(_layer(topk=3, method="oracle"))
    assert f["recall"] == 1.0
    assert f["mass_share"] == f["oracle_mass_share"] < 1
    assert _fidelity(_layer(topk=3, method="random"))["recall"] < 1


def test_residual_error_is_one_without_a_residual_or_with_a_zero_gate():
    for rla in (False, True):  # rla=None, and RLA with its zero-initialised gate: o_layer == o_sparse
        f = _fidelity(_layer(topk=3, rla=rla))
        assert f["residual_err"] == pytest.approx(1.0, abs=1e-6)
        assert f["layer_err"] == pytest.approx(f["sparse_err"], abs=1e-7) and f["sparse_err"] > 1e-3
    layer = _layer(topk=3)
    for block in (layer.rla.gate,):
        torch.nn.init.constant_(block.bias, 0.5)
    assert _fidelity(layer)["residual_err"] != pytest.approx(1.0, abs=1e-3)


def test_fidelity_known_case_by_hand():
    # One head, D = 1, block_size = 1 (block = token), q = 1 and k_j = log w_j: s_ij = log w_j, so token i's
    # attention weights are w_j / sum_{j<=i} w_j with w = [1, 2, 3, 4].
    w = torch.tensor([1.0, 2.0, 3.0, 4.0])
    q = torch.ones(1, 4, 1, 1, dtype=torch.float64)
    k = w.log().double().view(1, 4, 1, 1)
    oracle = oracle_selection(q, k, Selection(block_size=1, topk=2))
    # forced: the token itself; free pick: the heaviest earlier block
    assert oracle[0, 0].tolist() == [[0, -1], [0, 1], [1, 2], [2, 3]]
    selected = torch.tensor([[[[0, -1], [0, 1], [0, 2], [1, 3]]]], dtype=torch.int32)
    recall = BlockRecall()
    forced = torch.eye(4, dtype=torch.bool)
    recall.update(selected, oracle, 4, forced)
    assert recall.compute().item() == pytest.approx(1 / 3)  # free picks: token 1 hit, tokens 2 and 3 missed
    mass = AttentionMassShare()
    mass.update(ops.exact_block_log_mass(q, k, block_size=1), selected)
    # token shares: 1, 1, (1 + 3) / 6, (2 + 4) / 10
    assert mass.compute().item() == pytest.approx((1 + 1 + 4 / 6 + 6 / 10) / 4)

    err = ResidualError()
    o_dense, o_sparse = torch.ones(1, 2, 1, 2), torch.zeros(1, 2, 1, 2)
    err.update(o_dense, o_sparse, 0.5 * o_dense)  # the residual recovers half the missing contribution
    out = err.compute()
    assert out["sparse_err"].item() == pytest.approx(1.0) and out["layer_err"].item() == pytest.approx(0.5)
    assert out["residual_err"].item() == pytest.approx(0.5)
    exact = ResidualError()
    exact.update(o_dense, o_sparse, o_dense)
    assert exact.compute()["residual_err"].item() == 0.0


# ----------------------------------------------------------------------------------------------- perplexity


def test_position_buckets_known_case():
    assert bucket_edges(10, 4) == [(0, 3), (3, 5), (5, 8), (8, 10)]  # position i -> bucket i * 4 // 10
    metric = PositionBucketLoss(seq_len=8, num_buckets=4)
    losses = torch.arange(8.0).repeat(2, 1)
    valid = torch.ones(2, 8, dtype=torch.bool)
    valid[0, 1] = False  # ignored token
    metric.update(losses, valid)
    assert metric.compute().tolist() == pytest.approx([(0 + 0 + 1) / 3, 2.5, 4.5, 6.5])
    assert [b["tokens"] for b in metric.table()] == [3, 4, 4, 4]
    # uniform logits over V classes: loss log V everywhere, perplexity V
    V = 37
    uniform = PositionBucketLoss(seq_len=8, num_buckets=2)
    uniform.update(token_losses(torch.zeros(3, 8, V), torch.randint(0, V, (3, 8))))
    assert uniform.perplexity().tolist() == pytest.approx([V, V])


def test_position_buckets_one_bucket():
    # one bucket: still a list of one (torchmetrics squeezes one-element results; table() once failed on it)
    metric = PositionBucketLoss(seq_len=4, num_buckets=1)
    metric.update(torch.tensor([[1.0, 2.0, 3.0, 6.0]]))
    assert metric.table() == [{"start": 0, "end": 4, "tokens": 4, "loss": 3.0, "ppl": pytest.approx(math.exp(3.0))}]
    assert metric.perplexity().shape == (1,)


# ----------------------------------------------------------------------------------------------- sweeps


def _fake_results(label: str, acc: dict[str, float]) -> dict:
    per_task = {n: {"niah_single": a, "variable_tracking": a / 2} for n, a in acc.items()}
    return {"model": {"label": label, "global_step": 10, "attention": "SPLAAttention"},
            "ruler": {"per_task": per_task, "average": {n: sum(s.values()) / 2 for n, s in per_task.items()},
                      "num_samples": 20, "seed": ruler_seed(0)},
            "perplexity": {"ppl": 3.5, "length": 4096, "buckets": [{"ppl": 4.0}, {"ppl": 3.0}]},
            "fidelity": {"mean": {"recall": 0.9, "mass_share": 0.8, "residual_err": 0.7}}}


def test_collect_results_on_a_fake_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    for job, variant, acc in [("0_dense", "dense", {"1024": 1.0, "2048": 0.5}),
                              ("1_taylor2", "taylor2", {"1024": 0.8, "2048": 0.6})]:
        (sweep / job / ".hydra").mkdir(parents=True)
        (sweep / job / ".hydra" / "overrides.yaml").write_text(f"- +variant={variant}\n- experiment=ablation\n")
        (sweep / job / "eval").mkdir()
        (sweep / job / "eval" / "results.json").write_text(json.dumps(_fake_results(f"m-{variant}", acc)))
    (sweep / "2_crashed").mkdir()  # a job with neither checkpoint nor results is skipped
    assert [j.variant for j in find_jobs(sweep)] == ["dense", "taylor2"]
    script = runpy.run_path(str(ROOT / "scripts" / "collect_results.py"))  # the CLI, in-process (fast)
    assert script["main"]([str(sweep), "--lengths", "1024", "2048", "--out", str(tmp_path / "out"),
                           "--name", "abl"]) == 0
    summary = json.loads((tmp_path / "out" / "abl.json").read_text())
    assert [m["label"] for m in summary["models"]] == ["dense", "taylor2"]
    assert summary["models"][0]["average"] == {"1024": 0.75, "2048": 0.375}
    assert summary["models"][1]["mean"] == pytest.approx((0.6 + 0.45) / 2)
    md = (tmp_path / "out" / "abl.md").read_text()
    assert "| **dense** | `0_dense` | 10 | 75.0 | 37.5 | 56.2 | 3.50 | 3.00 | 0.900 | 0.800 | 0.700 |" in md
    assert (tmp_path / "out" / "abl.png").stat().st_size > 1000


@pytest.mark.slow
def test_tiny_ablation_pipeline_trains_evaluates_and_collects(tmp_path):
    sweep = tmp_path / "sweep"
    for num, variant in enumerate(["dense", "no_rla"]):
        job = sweep / f"{num}_{variant}"
        train(make_cfg(["experiment=ablation", f"+variant={variant}", "trainer=default", "data.seq_len=128",
                        "model.d_model=32", "model.n_layers=1", "sparse.block_size=16", "sparse.topk=3",
                        "data.val_samples=2", "trainer.max_steps=2", "trainer.val_check_interval=2"], job))
        (job / ".hydra").mkdir()
        (job / ".hydra" / "overrides.yaml").write_text(f"- experiment=ablation\n- +variant={variant}\n")
    summary = collect(sweep, tmp_path / "out", lengths=[64, 128], num_samples=2, tasks=["niah_single"],
                      extra=["perplexity.num_samples=1", "fidelity.num_samples=1"])
    rows = {m["label"]: m for m in summary["models"]}
    assert set(rows) == {"dense", "no_rla"}
    assert rows["dense"]["model"] == "dense" and rows["no_rla"]["model"] == "spla-taylor2-k3-norla"
    assert rows["dense"]["fidelity"] is None and rows["no_rla"]["fidelity"]["residual_err"] == pytest.approx(1.0)
    assert (sweep / "1_no_rla" / "eval" / "results.json").exists()
    assert "val/loss" in rows["dense"]["train"] and 0 <= rows["no_rla"]["train"]["fidelity/recall"] <= 1
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"ablation.json", "ablation.md", "ablation.png"}


# ----------------------------------------------------------------------------------------------- configs


ARMS = {"dense": ("DenseAttention", None, None), "taylor2": ("SPLAAttention", "taylor2", "subtract"),
        "taylor1": ("SPLAAttention", "taylor1", "subtract"), "random": ("SPLAAttention", "random", "subtract"),
        "no_rla": ("SPLAAttention", "taylor2", None)}


def test_ablation_arms_share_everything_but_the_attention():
    shared = {}
    for variant, (attention, scorer, rla) in ARMS.items():
        cfg = make_cfg(["experiment=ablation", f"+variant={variant}"], tiny=False)
        a = cfg.model.attention
        assert a._target_.endswith(attention), variant
        if attention == "SPLAAttention":
            assert a.scorer.method == scorer and (a.rla.mode if a.rla else None) == rla, variant
        assert cfg.hydra.sweeper.params["+variant"] == ",".join(ARMS)
        plain = OmegaConf.to_container(cfg, resolve=False)
        plain["model"].pop("attention")
        for key in ("data", "model", "optim", "trainer", "seed"):
            shared.setdefault(key, plain[key])
            assert plain[key] == shared[key], (variant, key)  # same model size, data, budget, seed
    assert shared["trainer"]["accelerator"] == "gpu" and shared["trainer"]["precision"] == "bf16-mixed"
    assert shared["data"]["seq_len"] == 4096 and cfg.sparse.block_size == 64 and 8 <= cfg.sparse.topk <= 16


@pytest.mark.slow
def test_fidelity_callback_logs_during_validation(tmp_path):
    metrics = train(make_cfg(["callbacks=fidelity", "trainer.max_steps=2",
                              "trainer.val_check_interval=2"], tmp_path))
    assert 0 <= metrics["fidelity/recall"] <= 1 and 0 < metrics["fidelity/mass_share/layer1"] <= 1
    assert metrics["fidelity/residual_err"] > 0
