"""How many steps until a model learns stage A's retrieval tasks? A lean training loop for small CPU experiments.

The run is ``experiment=study_a`` composed like ``python train.py experiment=study_a +variant=<arm> <overrides>``
and built by ``spla_lit.training.run.build`` (the same data, model, optimizer, LR schedule and training loss,
``spla_lit.training.lm_module.lm_loss``), but trained by a plain loop instead of Lightning: no checkpoints, no
loggers, only the training loss and, every ``--val-every`` steps, the validation exact match per task
(``LMModule.validation_step``'s metrics on ``data.val_samples`` samples of the validation mixture). It stops at the
first validation where every task reaches ``--target`` (or at ``--steps`` / ``--max-s``) and prints one JSON line:
steps and tokens to the target, per task and for all, and the validation history.

    python benchmarks/study/learnability.py --set data.seq_len=256 model.d_model=128 model.n_layers=2 \\
        data.batch_size=16 module.answer_loss_weight=1 --steps 2000 --json /tmp/learn.jsonl

CPU by default (``impl=reference``, float32); every ``--set`` is a ``train.py`` override.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

TASKS = ("niah_single", "mqar")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arm", default="dense", help="conf/variant/<arm>.yaml")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="train.py overrides")
    p.add_argument("--steps", type=int, default=2000, help="trainer.max_steps (the LR schedule's length)")
    p.add_argument("--val-every", type=int, default=100)
    p.add_argument("--target", type=float, default=0.9, help="exact match every validation task must reach")
    p.add_argument("--no-stop", action="store_true", help="train all --steps even after reaching the target")
    p.add_argument("--max-s", type=float, default=540.0, help="wall-time limit of the training loop (s)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: on a busy shared CPU, 2 threads ran 5x slower than 1)")
    p.add_argument("--label", default="", help="a name for the JSON line")
    p.add_argument("--json", type=Path, default=None, help="append the result line to this file")
    return p.parse_args(argv)


def compose_run(arm: str, steps: int, overrides: list[str]):
    """The run config of ``python train.py experiment=study_a +variant=<arm> <overrides>`` on the CPU."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    base = ["experiment=study_a", f"+variant={arm}", "impl=reference", "trainer.accelerator=cpu",
            "trainer.precision=32-true", "data.num_workers=0", f"trainer.max_steps={steps}", "logger=none"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=base + list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


@torch.no_grad()
def validate(module, loader) -> dict[str, float]:
    """Exact match per validation task, answer-token accuracy (in all and per task) and the validation loss
    (``LMModule.validation_step``'s metrics)."""
    module.eval()
    hits = torch.zeros(len(module.task_names))
    counts = torch.zeros(len(module.task_names))
    for batch in loader:
        module.validation_step(batch, 0)
        # answer-token accuracy per task (teacher-forced): progress below exact match, task by task
        right = (module(batch["input_ids"]).argmax(-1) == batch["labels"]) & batch["answer_mask"]
        hits.index_add_(0, batch["task_id"], right.sum(-1).float())
        counts.index_add_(0, batch["task_id"], batch["answer_mask"].sum(-1).float())
    out = {f"val/acc/{name}": float(metric.compute()) for name, metric in zip(module.task_names, module.val_task_acc)
           if metric.update_count}
    out["val/loss"] = float(module.val_loss.compute())
    out["val/answer_acc"] = float(module.val_answer_acc.compute())  # per answer token: progress before exact match
    out.update({f"val/answer_acc/{name}": float(h / c) for name, h, c in zip(module.task_names, hits, counts) if c})
    for metric in [module.val_loss, module.val_answer_acc, module.val_exact, *module.val_task_acc]:
        metric.reset()
    module.train()
    return out


def first_reach(history: list[dict[str, float]], keys: list[str], target: float) -> int | None:
    """First validation step where every ``keys`` metric is >= ``target``."""
    return next((int(r["step"]) for r in history if all(r.get(k, -1.0) >= target for k in keys)), None)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from spla_lit.training.lm_module import lm_loss
    from spla_lit.training.run import build

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = compose_run(args.arm, args.steps, args.set)
    datamodule, module = build(cfg)
    opt_cfg = module.configure_optimizers()
    optimizer, scheduler = opt_cfg["optimizer"], opt_cfg["lr_scheduler"]["scheduler"]
    weight = float(module.hparams.answer_loss_weight)
    clip = cfg.trainer.get("gradient_clip_val")
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    train_loader = datamodule.train_dataloader()
    val_loader = datamodule.val_dataloader()
    keys = [f"val/acc/{t}" for t in module.task_names]
    history: list[dict[str, float]] = []
    losses: list[float] = []
    t0 = time.monotonic()
    step = 0
    module.train()
    for batch in train_loader:
        logits = module(batch["input_ids"])
        loss, _ = lm_loss(logits, batch["labels"], batch["answer_mask"], weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(module.parameters(), float(clip))
        optimizer.step()
        scheduler.step()
        step += 1
        losses.append(float(loss.detach()))
        done = step >= args.steps or time.monotonic() - t0 > args.max_s
        if step % args.val_every == 0 or done:
            row = {"step": step, "wall_s": round(time.monotonic() - t0, 1),
                   "train_loss": round(sum(losses) / len(losses), 4), **validate(module, val_loader)}
            losses.clear()
            history.append(row)
            print(json.dumps(row), flush=True)
            if not args.no_stop and first_reach(history, keys, args.target) is not None:
                break
        if done:
            break
    wall = time.monotonic() - t0
    per_task = {t: first_reach(history, [f"val/acc/{t}"], args.target) for t in module.task_names}
    both = first_reach(history, keys, args.target)
    result = {"label": args.label, "arm": args.arm, "overrides": args.set, "steps_run": step,
              "tokens_per_step": tokens_per_step, "wall_s": round(wall, 1), "s_per_step": round(wall / step, 4),
              "answer_loss_weight": weight, "steps_to_target": both,
              "tokens_to_target": both * tokens_per_step if both else None,
              "steps_to_target_per_task": per_task, "final": history[-1] if history else None, "history": history}
    line = json.dumps(result)
    print(line)
    if args.json:
        with open(args.json, "a") as f:
            f.write(line + "\n")
    return result


if __name__ == "__main__":
    main()
