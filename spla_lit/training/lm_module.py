"""The LightningModule: next-token training of any ``spla_lit.models`` network."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from .callbacks import NonFiniteLossError
from .checkpoint_io import CheckpointError
from .schedule import held_then_warmup_cosine, warmup_cosine

IGNORE = -100


class LMModule(L.LightningModule):
    """Next-token language modelling with AdamW, warmup + cosine decay, and answer-token metrics.

    Args:
        net: the network, ``input_ids [B, N] -> logits [B, N, V]`` (e.g. ``spla_lit.models.DecoderLM``).
        optimizer: optimizer factory taking the parameter groups (a Hydra ``_partial_`` AdamW).
        warmup_steps, min_lr_ratio, total_steps: the LR schedule (see ``warmup_cosine``).
        weight_decay: applied to matrices only (not norms, biases, embeddings' gains).
        task_names: validation task names, for per-task answer accuracy.
        answer_loss_weight: training loss = LM loss over every token + ``answer_loss_weight`` x the mean loss over
            the answer tokens (``answer_mask``; synthetic tasks). 0 (default): the plain LM loss. The answers are
            ~0.2-2% of the tokens of a generated sequence, so with the plain loss the filler language dominates
            the gradient and retrieval is learnt late or never (``benchmarks/study/README.md``). Validation
            is unchanged (``val/loss`` stays the plain LM loss).
        run_config: the resolved run config, stored in every checkpoint (``eval.py`` rebuilds the model from it).
        new_parameters: names of ``net``'s parameters a pretrained checkpoint did not provide (``init_from``);
            they and the pretrained ones form separate parameter groups.
        freeze_pretrained_steps: for the first N optimizer steps only ``new_parameters`` are updated: the others'
            LR is 0 (their gradients still feed AdamW's moments, and the optimizer state and checkpoints keep one
            layout throughout, so a resume at any step is exact); from step N they follow the warmup + cosine
            schedule shifted to start at N.

    Logged: ``train/loss`` (the optimised loss), ``train/answer_loss`` (with ``answer_loss_weight`` > 0),
    ``train/grad_norm``, the LR, SPLA internals (``train/rla/gate_abs``, ``train/rla/residual_share``),
    ``val/loss``, ``val/ppl``, ``val/answer_acc`` (token accuracy on answer tokens), ``val/exact_match`` (all
    answer tokens of a sample right) and ``val/acc/<task>``.
    """

    def __init__(self, net: nn.Module, optimizer: Callable[..., torch.optim.Optimizer] | None = None,
                 warmup_steps: int = 50, min_lr_ratio: float = 0.1, total_steps: int = 1000,
                 weight_decay: float = 0.1, task_names: Sequence[str] = (),
                 run_config: dict[str, Any] | None = None, new_parameters: Sequence[str] = (),
                 freeze_pretrained_steps: int = 0, answer_loss_weight: float = 0.0) -> None:
        super().__init__()
        if isinstance(answer_loss_weight, bool) or not isinstance(answer_loss_weight, (int, float)) \
                or not math.isfinite(answer_loss_weight) or answer_loss_weight < 0:
            raise ValueError(f"module.answer_loss_weight must be a finite number >= 0, got {answer_loss_weight!r}")
        task_names = [str(t) for t in task_names]  # plain strings: checkpoints load with weights_only=True
        if isinstance(freeze_pretrained_steps, bool) or not isinstance(freeze_pretrained_steps, int) \
                or freeze_pretrained_steps < 0:
            raise ValueError(f"optim.freeze_pretrained_steps: must be an integer >= 0, got {freeze_pretrained_steps!r}")
        known = {n for n, _ in net.named_parameters()}
        unknown = [n for n in new_parameters if n not in known]
        if unknown:
            raise ValueError(f"new_parameters: {unknown[:3]} are not parameters of the network")
        self.new_parameters = [str(n) for n in new_parameters]
        self.save_hyperparameters(ignore=["net", "optimizer", "run_config", "new_parameters"], logger=False)
        self.net = net
        self.optimizer_factory = optimizer or partial(torch.optim.AdamW, lr=3e-4, betas=(0.9, 0.95))
        self.run_config = run_config
        self.task_names = task_names
        vocab = net.vocab_size
        self.val_loss = MeanMetric()
        self.val_answer_acc = MulticlassAccuracy(num_classes=vocab, average="micro", ignore_index=IGNORE)
        self.val_exact = MeanMetric()
        self.val_task_acc = nn.ModuleList(MeanMetric() for _ in self.task_names)
        self._step_losses: list[torch.Tensor] = []  # this optimizer step's micro-batch losses, checked once
        self._grad_norm: torch.Tensor | None = None  # from on_before_optimizer_step, for the clipping

    def forward(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(input_ids, cu_seqlens)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self(batch["input_ids"], batch.get("cu_seqlens"))
        weight = self.hparams.answer_loss_weight
        if weight:
            if batch.get("answer_mask") is None:
                raise ValueError("module.answer_loss_weight > 0 needs batches with an answer_mask (data=synthetic); "
                                 "this data module gives none")
            loss, answer_loss = lm_loss(logits, batch["labels"], batch["answer_mask"], weight)
            self.log("train/answer_loss", answer_loss, on_step=True, on_epoch=False)
        else:
            loss = self._loss(logits, batch["labels"])
        # Checked with the gradient norm before the optimizer step, not here: reading it now would make the
        # CPU wait for the forward, and the GPU idle while the backward is queued.
        self._step_losses.append(loss.detach())  # logged per optimizer step (the mean of its micro-batches)
        stats = getattr(self.net, "attention_stats", dict)()
        for key, value in stats.items():
            self.log(f"train/{key}", value, on_step=True, on_epoch=False)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # A NaN/inf loss (of any micro-batch) or gradient never reaches the weights: one host read per step
        # for both (one all-reduce when distributed), before the clipping and the update.
        norm = grad_norm(self.net)
        losses, self._step_losses = self._step_losses, []
        loss = torch.stack(losses).to(norm.device) if losses else norm.new_zeros(1)
        bad = torch.stack([(~torch.isfinite(loss)).any(), ~torch.isfinite(norm)]).float()
        bad_loss, bad_norm = self.trainer.strategy.reduce(bad, reduce_op="max").tolist()
        if bad_loss or bad_norm:
            if bad_loss:
                local = loss[~torch.isfinite(loss)]
                what = f"training loss is {local[0].item() if local.numel() else 'non-finite on another rank'}"
            else:
                what = f"gradient norm is {norm.item()}"
            raise NonFiniteLossError(f"{what} at step {self.global_step}: stopping before the optimizer step, "
                                     "so the weights and the last checkpoint stay finite")
        self._grad_norm = norm
        # The step's loss: the mean over its micro-batches and (sync_dist) over data-parallel ranks, i.e. the
        # loss of the global batch (equal tokens per micro-batch and rank).
        self.log("train/loss", loss.mean(), on_step=True, on_epoch=False, prog_bar=True, sync_dist=True)
        self.log("train/grad_norm", norm, on_step=True, on_epoch=False)

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        # Clip by the norm on_before_optimizer_step computed (Lightning's default computes it again, and for
        # sharded gradients all-reduces it once more).
        norm, self._grad_norm = self._grad_norm, None
        if not gradient_clip_val or gradient_clip_algorithm not in (None, "norm") or norm is None:
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        torch.nn.utils.clip_grads_with_norm_(params, float(gradient_clip_val), norm)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self(batch["input_ids"], batch.get("cu_seqlens"))
        labels, answer = batch["labels"], batch.get("answer_mask")
        self.val_loss(self._loss(logits, labels), weight=labels.numel())
        if answer is None:  # plain text (data=tokens): loss and perplexity only
            return
        pred = logits.argmax(-1)
        self.val_answer_acc(pred[answer], labels[answer])
        correct = ((pred == labels) | ~answer).all(-1).float()  # exact match (= greedy decoding's)
        has_answer = answer.any(-1)
        if has_answer.any():
            self.val_exact(correct[has_answer])
        for t, metric in enumerate(self.val_task_acc):
            sel = has_answer & (batch["task_id"] == t)
            if sel.any():
                metric(correct[sel])

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.log("val/loss", loss, prog_bar=True, sync_dist=False)
        self.log("val/ppl", torch.exp(loss.clamp(max=50)))
        if self.val_answer_acc.update_count:
            self.log("val/answer_acc", self.val_answer_acc.compute(), prog_bar=True)
            self.log("val/exact_match", self.val_exact.compute())
        for name, metric in zip(self.task_names, self.val_task_acc):
            if metric.update_count:
                self.log(f"val/acc/{name}", metric.compute())
            metric.reset()
        self.val_loss.reset()
        self.val_answer_acc.reset()
        self.val_exact.reset()

    def configure_model(self) -> None:
        # torch.compile of the blocks and FSDP2 sharding (trainer=fsdp), once; see training/parallelize.py
        from .parallelize import configure_model

        configure_model(self)

    def configure_optimizers(self):
        # Groups: (pretrained | new) x (decay: matrices | no decay); empty groups are left out, so the layout
        # depends only on the model and init_from (the same when a run resumes).
        new = set(self.new_parameters)
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        for name, p in self.net.named_parameters():
            if p.requires_grad:
                groups.setdefault((name in new, p.dim() >= 2), []).append(p)
        hp = self.hparams
        schedule = partial(warmup_cosine, warmup_steps=hp.warmup_steps, total_steps=hp.total_steps,
                           min_lr_ratio=hp.min_lr_ratio)
        held = partial(held_then_warmup_cosine, hold_steps=hp.freeze_pretrained_steps, warmup_steps=hp.warmup_steps,
                       total_steps=hp.total_steps, min_lr_ratio=hp.min_lr_ratio)
        order = sorted(groups, key=lambda g: (g[0], not g[1]))  # pretrained first, decay first
        optimizer = self.optimizer_factory([{"params": groups[g], "weight_decay": hp.weight_decay if g[1] else 0.0}
                                            for g in order])
        lambdas = [schedule if is_new or not hp.freeze_pretrained_steps else held for is_new, _ in order]
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        # A resumed run starts from finite weights and optimizer state, whatever wrote the checkpoint (the
        # single-file loader checks the file itself; this also covers sharded folders). One pass, one reduce.
        if self.trainer.ckpt_path is None:
            return
        local = [t.to_local() if hasattr(t, "to_local") else t for t in _state_tensors(self)]  # FSDP: own shard
        flags = [(~torch.isfinite(t)).any().to(self.device) for t in local if t.is_floating_point()]
        bad = torch.stack(flags).any().float() if flags else torch.zeros((), device=self.device)
        if self.trainer.strategy.reduce(bad, reduce_op="max").item():
            raise CheckpointError(f"ckpt_path: {self.trainer.ckpt_path}: the loaded weights or optimizer state "
                                  "hold NaN or inf values, refusing to train from them")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.run_config is not None:
            checkpoint["spla_config"] = self.run_config


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, answer_mask: torch.Tensor,
            answer_loss_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(training loss, answer loss) of ``logits [B, N, V]`` for ``labels [B, N]`` (``IGNORE`` = no label).

    answer loss = mean cross-entropy over the tokens where ``answer_mask [B, N]`` (bool) is set (0 when there are
    none); training loss = mean cross-entropy over every labelled token + ``answer_loss_weight`` x answer loss.
    """
    ce = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="none")
    labelled = labels.flatten() != IGNORE
    answer = answer_mask.flatten() & labelled
    # sums over masks rather than indexing: no host sync, the same graph for any number of answers
    lm = (ce * labelled).sum() / labelled.sum().clamp(min=1)
    ans = (ce * answer).sum() / answer.sum().clamp(min=1)
    return lm + answer_loss_weight * ans, ans.detach()


def _state_tensors(module: L.LightningModule) -> list[torch.Tensor]:
    """The module's parameters and its optimizers' state tensors."""
    tensors = [p.detach() for p in module.parameters()]
    for optimizer in module.trainer.optimizers:
        for state in optimizer.state.values():
            tensors += [v for v in state.values() if torch.is_tensor(v)]
    return tensors


def grad_norm(module: nn.Module) -> torch.Tensor:
    """Global L2 norm of the gradients (float32 scalar, no host sync). Sharded (DTensor, FSDP2) gradients
    are reduced over their own device mesh (``full_tensor``), so a shard replicated across nodes (hybrid
    sharding) counts once; plain gradients are local."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in module.parameters() if p.grad is not None]
    squares = torch.zeros(())
    for group in ([g for g in grads if isinstance(g, DTensor)], [g for g in grads if not isinstance(g, DTensor)]):
        if group:
            norm = torch.nn.utils.get_total_norm(group, 2.0)  # fused per-dtype kernels
            norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
            squares = squares.to(norm.device) + norm.float().square()
    return squares.sqrt()
