"""module.answer_loss_weight: the LM loss plus a weighted loss on the synthetic tasks' answer tokens."""

from __future__ import annotations

import math

import pytest
import torch
from hydra_utils import make_cfg

from spla_lit.training import LMModule
from spla_lit.training.lm_module import IGNORE, lm_loss
from spla_lit.training.run import train


def _reference(logits, labels, answer, weight):
    """Float64 loop: mean CE over labelled tokens + weight x mean CE over labelled answer tokens."""
    logp = torch.log_softmax(logits.double(), -1)
    lm, ans = [], []
    for b in range(labels.shape[0]):
        for n in range(labels.shape[1]):
            if labels[b, n] == IGNORE:
                continue
            ce = -float(logp[b, n, labels[b, n]])
            lm.append(ce)
            if answer[b, n]:
                ans.append(ce)
    a = sum(ans) / len(ans) if ans else 0.0
    return sum(lm) / len(lm) + weight * a, a


@pytest.mark.parametrize("weight", [0.0, 0.5, 3.0])
def test_lm_loss_matches_a_float64_reference(weight):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 10, 17, generator=g)
    labels = torch.randint(0, 17, (3, 10), generator=g)
    labels[0, :4] = IGNORE
    answer = torch.rand(3, 10, generator=g) < 0.3
    answer[0, 0] = True  # an answer on an ignored label does not count
    loss, ans = lm_loss(logits, labels, answer, weight)
    ref_loss, ref_ans = _reference(logits, labels, answer, weight)
    assert math.isclose(float(loss), ref_loss, rel_tol=1e-5)
    assert math.isclose(float(ans), ref_ans, rel_tol=1e-5)
    # weight 0 is exactly the plain LM loss that LMModule uses by default
    plain = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
    assert math.isclose(float(lm_loss(logits, labels, answer, 0.0)[0]), float(plain), rel_tol=1e-6)


def test_lm_loss_without_answers_is_the_lm_loss_and_its_gradient_reaches_answers_only_through_the_weight():
    logits = torch.randn(2, 6, 11, requires_grad=True)
    labels = torch.randint(0, 11, (2, 6))
    none = torch.zeros(2, 6, dtype=torch.bool)
    loss, ans = lm_loss(logits, labels, none, 2.0)
    assert float(ans.detach()) == 0.0
    assert math.isclose(float(loss.detach()), float(lm_loss(logits, labels, none, 0.0)[0].detach()), rel_tol=1e-6)
    answer = none.clone()
    answer[1, 3] = True
    g0 = torch.autograd.grad(lm_loss(logits, labels, answer, 0.0)[0], logits)[0]
    g1 = torch.autograd.grad(lm_loss(logits, labels, answer, 1.0)[0], logits)[0]
    diff = (g1 - g0).abs().sum(-1)
    assert diff[1, 3] > 0 and diff.sum() == diff[1, 3]  # the extra gradient is on the answer token only


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), True, "1"])
def test_bad_answer_loss_weight_is_rejected(bad):
    with pytest.raises(ValueError, match="answer_loss_weight"):
        LMModule(torch.nn.Linear(2, 2), answer_loss_weight=bad)


def test_answer_loss_weight_needs_an_answer_mask():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vocab_size = 8
            self.emb = torch.nn.Embedding(8, 8)

        def forward(self, ids, cu_seqlens=None):
            return self.emb(ids)

    module = LMModule(Net(), answer_loss_weight=1.0)
    batch = {"input_ids": torch.zeros(1, 4, dtype=torch.long), "labels": torch.zeros(1, 4, dtype=torch.long)}
    with pytest.raises(ValueError, match="answer_mask"):
        module.training_step(batch, 0)


@pytest.mark.slow
def test_training_with_the_answer_loss_logs_it(tmp_path):
    metrics = train(make_cfg(["logger=none", "trainer.max_steps=2", "module.answer_loss_weight=1"], tmp_path))
    assert metrics["global_step"] == 2 and "train/answer_loss" in metrics and "val/exact_match" in metrics
