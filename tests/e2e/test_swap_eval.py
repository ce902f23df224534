"""benchmarks/study/swap_eval.py: which evaluations a checkpoint gets, and the same-weights tables."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from hydra_utils import ROOT

sys.path.insert(0, str(ROOT / "benchmarks" / "study"))

import swap_eval  # noqa: E402


def _stored(attention: dict) -> dict:
    return {"spla_config": {"model": {"attention": attention}}}


SPLA = {"_target_": "spla_lit.layers.SPLAAttention", "sparse": {"mode": "topk"}, "rla": {"mode": "subtract"}}


@pytest.mark.parametrize("attention, expected", [
    ({"_target_": "spla_lit.layers.DenseAttention"},
     [[], ["model.attention=spla", "scorer.method=taylor2"], ["model.attention=spla", "scorer.method=random"]]),
    (SPLA, [["scorer.method=taylor2"], ["scorer.method=random"], ["rla.mode=none"]]),
    ({**SPLA, "rla": None}, [["scorer.method=taylor2"], ["scorer.method=random"]]),  # no residual to drop
    ({**SPLA, "sparse": {"mode": "window"}}, []),                                      # no top-k to swap
    ({"_target_": "spla_lit.layers.LinearAttention"}, []),
])
def test_plan_follows_the_stored_attention(monkeypatch, attention, expected):
    monkeypatch.setattr("spla_lit.eval.loading.load_checkpoint", lambda path: _stored(attention))
    assert swap_eval.plan(Path("x.ckpt"), ["taylor2", "random"]) == expected


def test_tags_columns_and_eval_command():
    assert swap_eval.tag([]) == "trained"
    assert swap_eval.tag(["model.attention=spla", "scorer.method=taylor1"]) == \
        "model_attention_spla+scorer_method_taylor1"
    assert [swap_eval.column(t) for t in ("trained", "rla_mode_none", "scorer_method_oracle",
                                          "model_attention_spla+scorer_method_taylor1")] == \
        ["dense", "no residual", "oracle", "taylor1"]
    args = swap_eval.parse_args(["a.ckpt", "--out", "o", "--device", "cpu", "--lengths", "512"])
    argv = swap_eval.eval_argv(Path("a.ckpt"), Path("o/evals/a__x"), ["model.attention=spla"], args, "reference")
    assert "override.model.attention=spla" in argv and "lengths=[512]" in argv and "device=cpu" in argv
    with pytest.raises(SystemExit):
        swap_eval.parse_args(["--out", "o"])  # nothing to evaluate


def _results(folder: Path, name: str, per_task: dict, mass: float, scorer: str = "taylor2",
             loss: float | None = None) -> None:
    d = folder / name
    d.mkdir(parents=True)
    d.joinpath("results.json").write_text(json.dumps({
        "model": {"attention_config": {"scorer": {"method": scorer}}}, "eval": {"overrides": {}},
        "ruler": {"per_task": per_task}, "fidelity": {"mean": {"mass_share": mass, "recall": mass}},
        **({} if loss is None else {"perplexity": {"loss": loss}})}))


def test_collect_pairs_scorers_on_the_same_weights(tmp_path):
    ev = tmp_path / "evals"

    def em(niah: float) -> dict:
        return {"1024": {"niah_single": niah, "mqar": 0.0}}

    # an SPLA checkpoint trained with taylor1 that learned niah (oracle 1.0) and one that did not (oracle 0.1)
    for run, scores, own in (("a_taylor1_s1", (0.9, 0.5, 0.0, 1.0, 0.2), "taylor1"),
                             ("b_taylor2_s1", (0.1, 0.0, 0.0, 0.1, 0.0), "taylor2")):
        for col, s, mass in zip(("taylor2", "taylor1", "random", "oracle"), scores[:4], (0.6, 0.5, 0.3, 0.7)):
            _results(ev, f"{run}__scorer_method_{col}", em(s), mass, scorer=col)
        _results(ev, f"{run}__rla_mode_none", em(scores[4]), 0.5, scorer=own)
    # a dense checkpoint: as trained, and read as block-sparse with each scorer
    _results(ev, "c_dense_s1__trained", em(1.0), 0.0)
    for col, s in zip(("taylor2", "taylor1", "random", "oracle"), (0.8, 0.4, 0.0, 0.9)):
        _results(ev, f"c_dense_s1__model_attention_spla+scorer_method_{col}", em(s), 0.5, scorer=col)

    summary = swap_eval.collect(ev, tmp_path, learned=0.5)
    runs = summary["runs"]
    assert runs["a_taylor1_s1"]["trained_scorer"] == "taylor1" and runs["c_dense_s1"]["dense"]
    assert runs["c_dense_s1"]["cells"]["dense"]["exact_match"]["1024"]["niah_single"] == 1.0
    pair = {(p["a"], p["b"], p["task"]): p for p in summary["paired"]}
    t2_t1 = pair[("taylor2", "taylor1", "niah_single")]
    assert t2_t1["runs"] == ["a_taylor1_s1", "c_dense_s1"]  # b never learned (oracle 0.1 < 0.5)
    assert t2_t1["diffs"] == pytest.approx([0.4, 0.4]) and t2_t1["mean"] == pytest.approx(0.4)
    own = pair[("own scorer", "no residual", "niah_single")]  # the taylor1 run's own scorer, residual on/off
    assert own["runs"] == ["a_taylor1_s1"] and own["diffs"] == pytest.approx([0.3])
    mass = next(p for p in summary["paired_fidelity"] if (p["a"], p["b"], p["key"]) == ("taylor2", "random",
                                                                                       "mass_share"))
    assert mass["n"] == 3 and mass["a_higher"] == 2  # the dense run: 0.5 both
    md = (tmp_path / "swaps.md").read_text()
    assert "| c_dense_s1 | 100 / 0 | 80 / 0 | 40 / 0 | 0 / 0 | 90 / 0 |  |" in md
    assert "| taylor2 − taylor1 | 1024 | niah_single | 2 | a_taylor1_s1, c_dense_s1 | +40.0 ± 0.0 |" in md


def test_collect_pairs_held_out_loss_and_names_best_checkpoints_by_run(tmp_path):
    em = {"4096": {"niah_single": 0.0}}
    # two taylor2-trained runs: their own scorer (taylor2) and the residual kept are the same evaluation
    for run, losses in (("05_taylor2_s1", (2.30, 2.31, 2.50, 2.29, 2.305)),
                        ("06_taylor2_s2", (2.32, 2.34, 2.60, 2.31, 2.315))):
        for col, loss in zip(("taylor2", "taylor1", "random", "oracle"), losses[:4]):
            _results(tmp_path / "evals", f"{run}__scorer_method_{col}", em, 0.5, scorer=col, loss=loss)
        _results(tmp_path / "evals", f"{run}__rla_mode_none", em, 0.5, loss=losses[4])
    summary = swap_eval.collect(tmp_path / "evals", tmp_path, learned=0.5)
    pair = {(p["a"], p["b"]): p for p in summary["paired_loss"]}
    assert pair[("taylor2", "taylor1")]["diffs"] == pytest.approx([-0.01, -0.02])
    assert pair[("taylor2", "taylor1")]["a_lower"] == 2
    assert pair[("own scorer", "no residual")]["diffs"] == pytest.approx([-0.005, 0.005])
    assert pair[("oracle", "taylor2")]["mean"] == pytest.approx(-0.01)
    md = (tmp_path / "swaps.md").read_text()
    assert "| 05_taylor2_s1 |  | 2.3000 | 2.3100 | 2.5000 | 2.2900 | 2.3050 |" in md
    assert "| taylor2 − random | 2 | 2 of 2 |" in md
    # a checkpoint file inside <run>/checkpoints/ is named by its run (the study evaluates best-val step files)
    for run in ("05_taylor2_s1", "06_taylor2_s2"):
        f = tmp_path / "cpt" / run / "checkpoints" / "step000350.ckpt"
        f.parent.mkdir(parents=True)
        f.write_bytes(b"")
    loose = tmp_path / "loose.ckpt"
    loose.write_bytes(b"")
    found = swap_eval.find_checkpoints(sorted((tmp_path / "cpt").glob("*/checkpoints/step000350.ckpt")) + [loose])
    assert sorted(found) == ["05_taylor2_s1", "06_taylor2_s2", "loose"]
