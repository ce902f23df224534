"""Study stage A: the collection maths (mean and 95% t-interval over seeds), records, tables, and the study_a
experiment composing for all eight arms."""

from __future__ import annotations

import builtins
import json
import math
import tarfile

import pytest
from hydra_utils import make_cfg
from omegaconf import OmegaConf

from spla_lit.config import validate_config
from spla_lit.eval.study import (
    ARM_ORDER,
    aggregate,
    collect_study,
    eval_settings,
    job_config,
    load_records,
    plot_study,
    plot_val_curves,
    run_record,
    study_markdown,
    t_interval,
    t_quantile,
)

# ------------------------------------------------------------------------------------------ statistics

# two-sided 95% critical values of Student's t (standard tables)
T_TABLE = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 9: 2.262, 10: 2.228, 30: 2.042}


@pytest.mark.parametrize("df", sorted(T_TABLE))
def test_t_quantile_matches_the_table(df):
    assert t_quantile(0.975, df) == pytest.approx(T_TABLE[df], abs=1e-3)


def test_t_quantile_median_and_bad_arguments():
    assert t_quantile(0.5, 3) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="p must be"):
        t_quantile(0.4, 3)
    with pytest.raises(ValueError, match="df must be"):
        t_quantile(0.975, 0)


def test_t_interval_of_known_values():
    iv = t_interval([0.8, 0.9, 1.0])
    # s = 0.1, n = 3: half = 4.3027 * 0.1 / sqrt(3)
    assert iv.n == 3 and iv.mean == pytest.approx(0.9)
    assert iv.half == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-5)
    assert iv.low == pytest.approx(0.9 - iv.half) and iv.high == pytest.approx(0.9 + iv.half)
    same = t_interval([0.5, 0.5, 0.5, 0.5])
    assert same.mean == 0.5 and same.half == 0.0


def test_t_interval_skips_missing_values_and_has_no_width_for_one_run():
    assert t_interval([0.7, None, float("nan")]) == t_interval([0.7])
    one = t_interval([0.7])
    assert one.mean == 0.7 and one.half is None and one.low is None
    empty = t_interval([None])
    assert empty.mean is None and empty.n == 0


# ------------------------------------------------------------------------------------------ records


def _eval(avg: dict[int, float], fid: dict[int, float] | None = None, ppl: float = 2.0) -> dict:
    """eval.py results with tasks a and b scoring ``avg[length] -/+ 0.1`` (mean ``avg``)."""
    per_task = {str(n): {"niah_single": v - 0.1, "mqar": v + 0.1} for n, v in avg.items()}
    out = {"model": {"label": "x", "global_step": 10},
           "eval": {"device": "cpu", "precision": "fp32", "impl": "reference"},
           "ruler": {"per_task": per_task, "average": {str(n): v for n, v in avg.items()},
                     "num_samples": 100, "seed": 2_000_000_011},
           "perplexity": {"length": 64, "ppl": ppl, "buckets": [
               {"start": 0, "end": 32, "loss": math.log(ppl), "ppl": ppl},
               {"start": 32, "end": 64, "loss": math.log(ppl + 1), "ppl": ppl + 1}]}}
    if fid is not None:
        mean = sum(fid.values()) / len(fid)
        out["fidelity"] = {"length": 32, "layers": {str(i): {"recall": r, "mass_share": r / 2} for i, r in fid.items()},
                           "mean": {"recall": mean, "mass_share": mean / 2}}
    return out


def _record(arm: str, seed: int, avg: dict[int, float] | None, fid=None, steps: int = 10, ppl: float = 2.0) -> dict:
    train = {"status": "ok" if steps >= 10 else "cut", "global_step": steps, "max_steps": 10, "tokens": steps * 640,
             "wall_s": 2.0, "tokens_per_s": steps * 320.0, "final": {"val/loss": 1.0 + seed}}
    return {"job": f"{arm}_{seed}", "arm": arm, "seed": seed, "config": {"data.seq_len": 32, "data.batch_size": 20},
            "train": train, "eval": None if avg is None else _eval(avg, fid, ppl)}


def _records() -> list[dict]:
    return [
        _record("taylor2", 1, {32: 0.6, 64: 0.3}, {0: 0.8, 1: 0.6}),
        _record("taylor2", 2, {32: 0.7, 64: 0.4}, {0: 0.9, 1: 0.7}),
        _record("taylor2", 3, {32: 0.8, 64: 0.5}, {0: 1.0, 1: 0.8}, steps=7),
        _record("dense", 1, {32: 0.9, 64: 0.1}, ppl=3.0),
        _record("dense", 2, None),  # evaluation missing
    ]


def test_aggregate_means_and_intervals_per_arm_length_task_layer_and_bucket():
    s = aggregate(_records())
    assert list(s["arms"]) == ["dense", "taylor2"]  # the order, not the input order
    assert s["lengths"] == [32, 64] and s["tasks"] == ["mqar", "niah_single"]
    t2 = s["arms"]["taylor2"]
    half = 4.302653 * 0.1 / math.sqrt(3)  # seeds 0.6 / 0.7 / 0.8: s = 0.1
    assert t2["average"]["32"]["mean"] == pytest.approx(0.7) and t2["average"]["32"]["half"] == pytest.approx(half)
    assert t2["average"]["64"]["mean"] == pytest.approx(0.4) and t2["average"]["64"]["n"] == 3
    assert t2["per_task"]["32"]["mqar"]["mean"] == pytest.approx(0.8)
    assert t2["per_task"]["32"]["niah_single"]["half"] == pytest.approx(half)
    assert t2["fidelity"]["0"]["recall"]["mean"] == pytest.approx(0.9)
    assert t2["fidelity"]["1"]["mass_share"]["mean"] == pytest.approx(0.35)
    assert t2["fidelity"]["1"]["mass_share"]["half"] == pytest.approx(half / 2)
    assert t2["perplexity"]["buckets"][1]["ppl"]["mean"] == pytest.approx(3.0)
    assert t2["train"]["global_step"]["mean"] == pytest.approx(9.0) and t2["train"]["cut"] == 1
    dense = s["arms"]["dense"]
    assert dense["evaluated"] == 1 and dense["train"]["failed"] == 1
    assert dense["average"]["64"] == {"mean": pytest.approx(0.1), "half": None, "n": 1}
    assert "fidelity" not in dense
    assert dense["train"]["val/loss"]["mean"] == pytest.approx(2.5)  # both runs trained


def test_markdown_has_interval_cells_and_flags_missing_runs():
    records = _records()
    text = study_markdown(aggregate(records), records, title="T")
    assert text.startswith("# T\n")
    half = 100 * 4.302653 * 0.1 / math.sqrt(3)
    assert f"| SPLA taylor2 | 3 | 70.0 ± {half:.1f} | 40.0 ± {half:.1f} |" in text
    assert "| dense | 1 | 90.0 | 10.0 |" in text
    assert "32 (1x)" in text and "64 (2x)" in text
    assert "`dense_2` | dense | 2 | ok | 10 | **missing** |" in text
    assert "t(0.975, n-1)" in text


def test_collect_study_writes_records_tables_and_reads_them_back(tmp_path):
    records = _records()
    summary = collect_study(records, tmp_path / "out", name="s", plot=False)
    out = tmp_path / "out"
    assert sorted(p.name for p in (out / "runs").iterdir()) == [
        "dense_s1.json", "dense_s2.json", "taylor2_s1.json", "taylor2_s2.json", "taylor2_s3.json"]
    assert json.loads((out / "s.json").read_text())["arms"]["taylor2"]["average"]["32"]["n"] == 3
    assert (out / "s.md").read_text().startswith("# Study: s\n")
    # round trip: a folder of records, and a tar.gz as the launcher writes it
    assert aggregate(load_records([out / "runs"])) == json.loads(json.dumps(summary))
    archive = tmp_path / "runs.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(out / "runs", arcname="runs")
    assert len(load_records([archive])) == 5
    with pytest.raises(FileNotFoundError):
        load_records([tmp_path / "nothing"])
    with pytest.raises(ValueError, match="records"):
        collect_study([], tmp_path / "empty")


def test_plot_study_draws_bands_or_skips_without_matplotlib(tmp_path, monkeypatch):
    records = _records()
    for i, r in enumerate(records):
        r["train"]["val_history"] = [{"step": s, "val/loss": 3.0 - s / 10 + i / 100} for s in (1, 2, 3)]
    summary = aggregate(records)
    pytest.importorskip("matplotlib")
    assert plot_study(summary, tmp_path / "a.png").is_file()
    assert plot_val_curves(records, tmp_path / "v.png").is_file()
    assert plot_val_curves([_record("dense", 1, None)], tmp_path / "none.png") is None  # no history: no figure
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert plot_study(summary, tmp_path / "b.png") is None
    assert plot_val_curves(records, tmp_path / "w.png") is None
    assert not (tmp_path / "b.png").exists() and not (tmp_path / "w.png").exists()


def test_run_record_reads_a_job_folder(tmp_path):
    job = tmp_path / "3_taylor2_s2"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("- experiment=study_a\n- +variant=taylor2\n- seed=2\n")
    (job / ".hydra" / "config.yaml").write_text("seed: 2\ndata:\n  seq_len: 32\n  batch_size: 4\n"
                                                "paths:\n  output_dir: ${hydra:runtime.output_dir}\n")
    (job / "eval").mkdir()
    (job / "eval" / "results.json").write_text(json.dumps(_eval({32: 0.5})))
    r = run_record(job)
    assert (r["arm"], r["seed"], r["job"]) == ("taylor2", 2, "3_taylor2_s2")
    assert r["config"] == {"seed": 2, "data.seq_len": 32, "data.batch_size": 4}
    assert r["train"] == {"status": "no training logs"} and r["eval"]["ruler"]["average"]["32"] == 0.5
    assert r["overrides"] == ["experiment=study_a", "+variant=taylor2", "seed=2"]


def test_job_config_takes_model_sizes_from_an_init_from_folder(tmp_path):
    # a CPT run's Hydra config still shows the default model.* sizes; the model came from init_from's config.json
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                                  "vocab_size": 256, "hidden_size": 32, "intermediate_size": 64,
                                                  "num_hidden_layers": 2, "num_attention_heads": 2,
                                                  "num_key_value_heads": 1}))
    job = tmp_path / "0_taylor2_s1"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "config.yaml").write_text(f"init_from: {base}\nmodel:\n  d_model: 128\n  n_layers: 4\n")
    assert job_config(job) == {"init_from": str(base), "model.d_model": 32, "model.n_layers": 2, "model.n_heads": 2,
                               "model.n_kv_heads": 1, "model.head_dim": 16}
    (base / "config.json").unlink()  # gone (another machine): the config's own values stay
    assert job_config(job) == {"model.d_model": 128, "model.n_layers": 4}


def test_eval_settings_are_multiples_of_the_training_length():
    lengths, extra = eval_settings(1024)
    assert lengths == [1024, 2048, 4096, 8192]
    assert "perplexity.length=8192" in extra and "num_samples=100" in extra


# ------------------------------------------------------------------------------------------ study_a configs

# arm -> (attention class, scorer, rla mode, combine, sparse mode)
ARMS = {
    "dense": ("DenseAttention", None, None, None, None),
    "taylor2": ("SPLAAttention", "taylor2", "subtract", "add", "topk"),
    "taylor1": ("SPLAAttention", "taylor1", "subtract", "add", "topk"),
    "random": ("SPLAAttention", "random", "subtract", "add", "topk"),
    "no_rla": ("SPLAAttention", "taylor2", None, None, "topk"),
    "joint": ("SPLAAttention", "taylor2", "subtract", "joint", "topk"),
    "window": ("SPLAAttention", None, "subtract", "add", "window"),
    "linear": ("LinearAttention", None, None, None, None),
}


def test_study_a_composes_all_eight_arms_with_the_same_data_model_and_budget():
    assert tuple(ARMS) == ARM_ORDER
    shared = {}
    for arm, (attention, scorer, rla, combine, mode) in ARMS.items():
        cfg = make_cfg(["experiment=study_a", f"+variant={arm}", "trainer.accelerator=cpu"], tiny=False)
        validate_config(cfg)
        a = OmegaConf.to_container(cfg.model.attention, resolve=True)
        assert a["_target_"].endswith(attention), arm
        if attention == "SPLAAttention":
            sel = a["sparse"]
            assert sel["mode"] == mode and sel["block_size"] == 16, arm
            # the same exact-key budget for every sparse arm: 8 of the 64 blocks at the training length
            assert (sel["topk"] if mode == "topk" else sel["local_blocks"]) == 8, arm
            assert cfg.data.seq_len // sel["block_size"] == 64
            if mode == "topk":
                assert a["scorer"]["method"] == scorer and sel["local_blocks"] == 1, arm
            assert (a["rla"] or {}).get("mode") == rla and (a["rla"] or {}).get("combine") == combine, arm
            assert a["impl"] == "auto"
        plain = OmegaConf.to_container(cfg, resolve=False)
        plain["model"].pop("attention")
        for key in ("data", "model", "optim", "trainer", "seed", "callbacks"):
            shared.setdefault(key, plain[key])
            assert plain[key] == shared[key], (arm, key)
    params = cfg.hydra.sweeper.params
    assert params["+variant"] == ",".join(ARMS) and params["seed"] == "1,2,3"
    assert shared["trainer"]["precision"] == "bf16-mixed" and shared["model"]["head_dim"] == 64
    assert {k for k, v in shared["data"]["mixture"].items() if v} == {"niah_single", "mqar", "copy"}
    kwargs = shared["data"]["task_kwargs"]
    assert kwargs["mqar"]["key_len"] == kwargs["niah_single"]["key_len"] == 1
    assert shared["data"]["val_mixture"] == {"niah_single": 0.5, "mqar": 0.5}
    assert shared["callbacks"]["model_checkpoint"] is None


@pytest.mark.slow
@pytest.mark.parametrize("arm", list(ARMS))
def test_study_a_arm_builds_and_runs_forward_backward(arm):
    import torch
    from hydra.utils import instantiate

    cfg = make_cfg(["experiment=study_a", f"+variant={arm}", "trainer.accelerator=cpu", "impl=reference",
                    "model.n_layers=1"], tiny=False)
    net = instantiate(cfg.model)
    ids = torch.randint(0, cfg.data.vocab_size, (1, 64))
    net(ids).float().square().mean().backward()


@pytest.mark.slow
# One arm per kernel path (taylor2's scoring + add-combine, joint's combine, window's fixed selection); taylor1,
# random and no_rla differ from taylor2 only in the scorer or the missing residual, whose kernels tests/kernels covers.
@pytest.mark.parametrize("arm", ["taylor2", "joint", "window"])
def test_triton_kernels_take_the_study_shapes(arm):
    """The Triton path (impl=triton: no silent fallback) accepts each sparse arm's geometry at the study's head dim
    (64), GQA group (2), block (16) and topk (8), forward and backward (here under the interpreter)."""
    import torch

    from spla_lit import ops
    from spla_lit.config import selection_from_config

    cfg = make_cfg(["experiment=study_a", f"+variant={arm}", "trainer.accelerator=cpu"], tiny=False)
    sel = selection_from_config(cfg)
    rla = OmegaConf.to_container(cfg.model.attention, resolve=True)["rla"]
    kwargs = {"rla": "none"} if rla is None else {"rla": rla["mode"], "combine": rla["combine"]}
    torch.manual_seed(0)
    n = 10 * sel.block_size  # 10 blocks: more than topk, so the scorer chooses
    q = torch.randn(1, n, 4, 64, requires_grad=True)
    k, v = (torch.randn(1, n, 2, 64, requires_grad=True) for _ in range(2))
    outs = []
    for impl in ("triton", "reference"):
        gen = torch.Generator().manual_seed(1) if sel.mode == "topk" and sel.scorer == "random" else None
        outs.append(ops.spla_attention(q, k, v, sel, impl=impl, generator=gen, **kwargs))
    outs[0].square().sum().backward()
    torch.testing.assert_close(outs[0], outs[1], atol=1e-4, rtol=1e-4)
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


def test_paired_differences_pair_arms_by_seed_and_reach_the_tables():
    def rec(arm, seed, best, short_ppl):
        r = _record(arm, seed, {32: 0.5})
        r["train"]["val_history"] = [{"step": 1, "val/loss": best + 1.0}, {"step": 2, "val/loss": best},
                                     {"step": 3, "val/loss": best + 0.5}]
        r["eval_short"] = {"perplexity": {"length": 16, "ppl": short_ppl, "loss": math.log(short_ppl)}}
        return r

    records = [rec("taylor2", 1, 2.0, 10.0), rec("taylor2", 2, 2.2, 10.0), rec("taylor2", 3, 2.1, 10.0),
               rec("dense", 1, 2.1, 20.0), rec("dense", 2, 2.1, 20.0),  # no seed 3: two pairs
               rec("taylor1", 9, 1.0, 1.0)]  # no seed in common with taylor2: no row
    rows = {(p["a"], p["b"], p["metric"]): p for p in aggregate(records)["paired"]}
    best = rows["taylor2", "dense", "best val loss"]
    assert best["seeds"] == [1, 2] and best["diffs"] == pytest.approx([-0.1, 0.1])
    assert best["stat"]["mean"] == pytest.approx(0.0) and (best["below"], best["above"]) == (1, 1)
    short = rows["taylor2", "dense", "short-context loss"]
    assert short["diffs"] == pytest.approx([math.log(0.5)] * 2) and short["below"] == 2
    assert not any(a == "taylor2" and b == "taylor1" for a, b, _ in rows)
    s = aggregate(records)
    assert s["arms"]["taylor2"]["train"]["val/loss_best"]["mean"] == pytest.approx(2.1)
    assert s["arms"]["taylor2"]["train"]["val/loss_best_step"]["mean"] == pytest.approx(2.0)
    text = study_markdown(s, records)
    assert "## Paired by seed" in text and "| SPLA taylor2 - dense | best val loss | 2 | 0.0000 ± " in text


def test_run_record_trains_to_last_ckpt_when_an_earlier_checkpoint_was_evaluated(tmp_path):
    torch = pytest.importorskip("torch")
    from torch.utils.tensorboard import SummaryWriter

    job = tmp_path / "00_taylor2_s1"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "config.yaml").write_text("seed: 1\ndata:\n  seq_len: 32\n  batch_size: 4\n"
                                                "trainer:\n  max_steps: 10\n")
    with SummaryWriter(str(job / "tensorboard")) as w:
        for step, loss in ((4, 2.0), (9, 3.0)):  # logged at global_step - 1
            w.add_scalar("val/loss", loss, step)
    (job / "checkpoints").mkdir()
    torch.save({"global_step": 10}, job / "checkpoints" / "last.ckpt")
    ev = _eval({32: 0.5})
    ev["model"]["global_step"] = 5  # the best-validation checkpoint was evaluated
    (job / "eval").mkdir()
    (job / "eval" / "results.json").write_text(json.dumps(ev))
    r = run_record(job)
    assert r["train"]["global_step"] == 10 and r["train"]["status"] == "ok" and r["train"]["tokens"] == 10 * 128
    assert r["eval"]["model"]["global_step"] == 5
    assert [h["step"] for h in r["train"]["val_history"]] == [5, 10]
