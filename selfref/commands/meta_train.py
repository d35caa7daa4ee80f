"""``selfref meta-train``: meta-train a self-referential net's modifier on a task family.

Writes a run directory (../shared/DESIGN.md, "Runs") under ``<logdir>/meta-train/`` with
TensorBoard events (meta/loss, meta/grad_norm, held-out curves beside fixed-lr SGD and Adam,
update norms and histograms, the config as text), ``config.json``, ``argv.txt``,
``checkpoints/last.pt`` every ``--checkpoint-every`` meta-steps and ``checkpoints/best.pt``
(chosen by held-out final loss), and ``results.json``. ``--resume RUN_DIR`` continues a run
from its ``last.pt`` with the configuration it was started with.

Example:
    selfref meta-train --task quadratic --core lstm --meta-steps 500 --logdir logs
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from selfref.commands.common import (
    UsageError,
    add_device_arg,
    add_logdir_arg,
    nonneg_int,
    parse_task_options,
    positive_float,
    positive_int,
)

__all__ = ["add_parser", "run"]

# Baselines drawn beside the learned optimizer's held-out curve (fixed, untuned settings).
_CURVE_BASELINES = {"sgd": ("sgd", {"lr": 0.01}), "adam": ("adam", {"lr": 0.1})}


def add_parser(subparsers: Any) -> None:
    from selfref.net.cores import core_names
    from selfref.tasks import names as task_names

    p = subparsers.add_parser(
        "meta-train",
        help="meta-train a modifier core (L2L LSTM, ...) on a task family",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("--task", default="quadratic", choices=task_names(), help="task family")
    p.add_argument(
        "--task-option",
        "-o",
        action="append",
        metavar="KEY=VALUE",
        help="task constructor option, repeatable (e.g. hidden=40)",
    )
    p.add_argument("--core", default="lstm", choices=core_names(), help="modifier core")
    p.add_argument("--meta-steps", type=positive_int, default=1000, help="meta-gradient updates")
    p.add_argument("--unroll", type=positive_int, default=20, help="steps per truncation")
    p.add_argument("--inner-steps", type=positive_int, default=100, help="inner horizon")
    p.add_argument(
        "--meta-batch", type=positive_int, default=128, help="task instances per meta-batch"
    )
    p.add_argument(
        "--meta-lr", type=positive_float, default=1e-3, help="Adam lr on the meta-params"
    )
    p.add_argument("--lr-schedule", default="constant", choices=["constant", "cosine"])
    p.add_argument("--warmup-steps", type=nonneg_int, default=0)
    p.add_argument("--meta-loss", default="sum", choices=["sum", "log_sum"])
    p.add_argument("--clip-grad-norm", type=float, default=1.0, help="0 disables clipping")
    p.add_argument("--second-order", action="store_true", help="keep second derivatives")
    p.add_argument("--checkpoint-every", type=nonneg_int, default=100)
    p.add_argument("--eval-every", type=nonneg_int, default=50)
    p.add_argument("--eval-tasks", type=positive_int, default=100, help="held-out instances")
    p.add_argument("--resume", metavar="RUN_DIR", default=None, help="continue this run")
    p.add_argument("--seed", type=int, default=0)
    add_logdir_arg(p)
    add_device_arg(p)
    p.set_defaults(func=run)


def _build(
    task_name: str,
    task_opts: dict[str, Any],
    net_desc: dict[str, Any] | None,
    args: argparse.Namespace | None,
    device: str,
) -> Any:
    from selfref.net import EvaluationConfig, SelfReferentialNet
    from selfref.tasks import make

    task = make(task_name, device=device, **task_opts)
    if net_desc is not None:
        return task, SelfReferentialNet.from_description(task, net_desc)
    assert args is not None
    net = SelfReferentialNet.from_task(
        task, core=args.core, evaluation=EvaluationConfig(second_order=args.second_order)
    )
    return task, net


def run(args: argparse.Namespace) -> int:
    from selfref.logging import MultiLogger, PrintLogger, TensorBoardLogger
    from selfref.meta import MetaTrainConfig, MetaTrainer
    from selfref.runs import RunDir
    from selfref.tasks import resolve_device

    if args.task == "fewshot-digits":
        # in-context learning: backprop through sequences, not a learned-optimizer loop
        from selfref.commands import meta_train_incontext

        return meta_train_incontext.run(args)
    device = str(resolve_device(args.device))
    if args.resume:
        run_dir = RunDir.open(args.resume)
        if not (run_dir.checkpoints / "last.pt").is_file():
            raise UsageError(f"--resume {args.resume!r}: no checkpoints/last.pt to resume from")
        saved = run_dir.read_config()
        missing = [k for k in ("meta", "task", "net") if k not in saved]
        if missing:
            raise UsageError(
                f"--resume {args.resume!r} is not a meta-train run directory (its config.json "
                f"has no {', '.join(missing)})"
            )
        run_dir.load_checkpoint("last.pt")  # a bad or unsafe file fails before any work
        cfg = MetaTrainConfig.from_dict(saved["meta"])
        task, net = _build(saved["task"], saved.get("task_options", {}), saved["net"], None, device)
    else:
        if args.clip_grad_norm < 0:
            raise UsageError(f"--clip-grad-norm must be >= 0, got {args.clip_grad_norm}")
        task_opts = parse_task_options(args.task_option)
        cfg = MetaTrainConfig(
            meta_steps=args.meta_steps,
            unroll=args.unroll,
            inner_steps=args.inner_steps,
            meta_batch=args.meta_batch,
            meta_lr=args.meta_lr,
            lr_schedule=args.lr_schedule,
            warmup_steps=args.warmup_steps,
            meta_loss=args.meta_loss,
            clip_grad_norm=args.clip_grad_norm,
            eval_every=args.eval_every,
            eval_tasks=args.eval_tasks,
            checkpoint_every=args.checkpoint_every,
            seed=args.seed,
        )
        task, net = _build(args.task, task_opts, None, args, device)
        run_dir = RunDir.create(args.logdir, "meta-train", f"{args.task}-{args.core}", args.seed)
        run_dir.write_config(
            {
                "task": args.task,
                "task_options": task_opts,
                "meta": cfg,
                "net": net.describe(),
                "device": device,
            }
        )
    tb = TensorBoardLogger(run_dir.path)
    logger = MultiLogger(
        [tb, PrintLogger(every=max(1, cfg.meta_steps // 20), prefixes=("meta/loss", "heldout/"))]
    )
    baselines = (
        _CURVE_BASELINES
        if task.name == "quadratic"
        else {"sgd": ("sgd", {"lr": 0.1}), "adam": ("adam", {"lr": 0.01})}
    )
    trainer = MetaTrainer(net, cfg, logger, run_dir=run_dir, baselines=baselines)
    if args.resume:
        trainer.resume(run_dir.checkpoints / "last.pt")
    try:
        res = trainer.train()
    finally:
        logger.close()
    out = {
        "task": task.name,
        "core": net.core.name,
        "meta_steps": cfg.meta_steps,
        "best_step": res.best_step,
        "best_heldout_final_log10_loss": res.best_score if math.isfinite(res.best_score) else None,
        "skipped": res.skipped,
        "meta_train_grad_evals": res.meta_train_grad_evals,
        "history": res.history,
        "best_checkpoint": str(run_dir.checkpoints / "best.pt"),
    }
    run_dir.write_results(out)
    print(json.dumps({k: v for k, v in out.items() if k != "history"}))
    print(f"run directory: {run_dir.path}")
    return 0
