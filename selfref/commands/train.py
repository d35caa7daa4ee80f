"""``selfref train``: one training run of a task with a fixed optimizer, logged to a run dir.

Example::

    selfref train --task digits-mlp --optimizer adam --lr 0.01 --steps 200
    tensorboard --logdir logs/train/<YYYYmmdd-HHMMSS>-adam-s0

The run directory (``<logdir>/<experiment>/<stamp>-<optimizer>-s<seed>/``) receives
``argv.txt``, ``config.json`` (every argument, the resolved hyperparameters and task
options), TensorBoard events (``inner/loss``, ``val/loss``, ``val/accuracy``,
``best/val_loss_vs_grad_evals``, the config as text, one HParams entry with the final
metrics), ``results.json`` (a :class:`selfref.methods.base.Result`) and
``checkpoints/final.pt`` (the trained parameters).
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from typing import Any

from selfref.commands.common import (
    UsageError,
    add_device_arg,
    add_logdir_arg,
    check_folder_name,
    nonneg_int,
    parse_task_options,
)

__all__ = ["add_parser", "run"]

_DTYPES = ("float32", "float64")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    from selfref.optim import OPTIMIZERS

    p = subparsers.add_parser(
        "train",
        help="train one task with a fixed optimizer and log the run",
        description=(
            "Train a task with a functional optimizer and fixed hyperparameters; writes "
            "config.json, results.json and TensorBoard events into a new run directory."
        ),
        epilog="example: selfref train --task digits-mlp --optimizer adam --lr 0.01 --steps 200",
    )
    p.add_argument(
        "--task", default="digits-mlp", help="task name, see `selfref tasks` (default: digits-mlp)"
    )
    p.add_argument(
        "--optimizer",
        default="adam",
        help=f"one of {', '.join(OPTIMIZERS)} (default: adam)",
    )
    p.add_argument(
        "--lr", type=float, default=None, help="learning rate (default: the optimizer's)"
    )
    p.add_argument("--momentum", type=float, default=None, help="momentum (momentum, nesterov)")
    p.add_argument("--weight-decay", type=float, default=None, help="L2 added to the gradient")
    p.add_argument(
        "--hparam",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other optimizer hyperparameter, e.g. beta2=0.99 (repeatable)",
    )
    p.add_argument("--steps", type=int, default=1000, help="training steps (default: 1000)")
    p.add_argument(
        "--seed", type=nonneg_int, default=0, help="seed of init and batch order (default: 0)"
    )
    p.add_argument(
        "--batch-size", type=int, default=None, help="minibatch size (default: the task's)"
    )
    add_logdir_arg(p)
    p.add_argument(
        "--experiment", default=None, help="experiment folder under --logdir (default: train)"
    )
    add_device_arg(p)
    p.add_argument(
        "--task-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="task constructor option, e.g. hidden=40 or activation=relu (repeatable)",
    )
    p.add_argument("--data-dir", default=None, help="directory of data files (mnist-mlp IDX files)")
    p.add_argument(
        "--eval-every",
        type=int,
        default=None,
        help="evaluate the val split every K steps (default: steps/20)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def _task_options(args: argparse.Namespace) -> dict[str, Any]:
    """--task-option, --batch-size, --data-dir, --device -> keyword arguments of the task."""
    import torch

    from selfref import tasks

    opts = parse_task_options(args.task_option)
    for key, flag in (
        ("device", "--device"),
        ("data_dir", "--data-dir"),
        ("batch_size", "--batch-size"),
    ):
        if key in opts:
            raise UsageError(f"task option {key!r} is set with {flag}, not --task-option")
    if "dtype" in opts:
        if opts["dtype"] not in _DTYPES:
            raise UsageError(
                f"task option dtype={opts['dtype']!r} is invalid; valid: {', '.join(_DTYPES)}"
            )
        opts["dtype"] = getattr(torch, opts["dtype"])
    if args.task not in tasks.names():
        raise UsageError(f"unknown task {args.task!r}; known tasks: {', '.join(tasks.names())}")
    accepted = inspect.signature(tasks.task_class(args.task)).parameters
    if args.batch_size is not None:
        if args.batch_size < 1:
            raise UsageError(f"--batch-size must be a positive integer, got {args.batch_size}")
        if "batch_size" not in accepted:
            raise UsageError(
                f"--batch-size does not apply to task {args.task!r} (it has no minibatches)"
            )
        opts["batch_size"] = args.batch_size
    if args.data_dir is not None:
        if "data_dir" not in accepted:
            raise UsageError(
                f"--data-dir does not apply to task {args.task!r}; tasks that read files: "
                + ", ".join(
                    n
                    for n in tasks.names()
                    if "data_dir" in inspect.signature(tasks.task_class(n)).parameters
                )
            )
        opts["data_dir"] = args.data_dir
    opts["device"] = args.device
    return opts


def _hparams(args: argparse.Namespace) -> dict[str, Any]:
    from selfref.optim import resolve_hparams

    given: dict[str, Any] = {}
    for item in args.hparam:
        if "=" not in item:
            raise UsageError(f"--hparam {item!r} must look like key=value, e.g. beta2=0.99")
    for k, v in parse_task_options(args.hparam).items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise UsageError(f"--hparam {k}={v!r} is not a number")
        given[k] = float(v)
    for flag, key in (("lr", "lr"), ("momentum", "momentum"), ("weight_decay", "weight_decay")):
        v = getattr(args, flag)
        if v is not None:
            given[key] = v
    if args.lr is not None and not args.lr > 0:
        raise UsageError(f"--lr must be a positive number, got {args.lr}")
    try:
        return resolve_hparams(args.optimizer, given)
    except ValueError as e:
        raise UsageError(str(e)) from None


def run(args: argparse.Namespace) -> int:
    from selfref import tasks
    from selfref.budget import reset_peak_memory
    from selfref.logging import TensorBoardLogger
    from selfref.methods.base import Tracker
    from selfref.optim import OPTIMIZERS
    from selfref.runs import RunDir, check_logdir
    from selfref.train import train

    # Validate everything before anything is written.
    if args.optimizer not in OPTIMIZERS:
        raise UsageError(f"unknown optimizer {args.optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
    if args.steps < 1:
        raise UsageError(f"--steps must be a positive integer, got {args.steps}")
    if args.eval_every is not None and args.eval_every < 1:
        raise UsageError(f"--eval-every must be a positive integer, got {args.eval_every}")
    if args.experiment is not None:
        check_folder_name("--experiment", args.experiment)
    hparams = _hparams(args)
    check_logdir(args.logdir)
    task_opts = _task_options(args)
    task = tasks.make(args.task, **task_opts)
    eval_every = args.eval_every or max(1, args.steps // 20)

    argv = getattr(args, "argv", None)
    run_dir = RunDir.create(
        args.logdir, args.experiment or "train", args.optimizer, args.seed, argv=argv
    )
    config = {
        "command": "train",
        "args": {k: v for k, v in vars(args).items() if k not in ("func", "argv")},
        "task": task.name,
        "task_options": {**task_opts, "device": str(task.device), "dtype": str(task.dtype)},
        "optimizer": args.optimizer,
        "hparams": hparams,
        "steps": args.steps,
        "seed": args.seed,
        "eval_every": eval_every,
        "batch_size": task.batch_size,
    }
    run_dir.write_config(config)

    logger = TensorBoardLogger(run_dir.path)
    try:
        logger.text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```")
        reset_peak_memory(task.device)
        t0 = time.perf_counter()
        out = train(
            task,
            args.optimizer,
            hparams,
            args.steps,
            args.seed,
            logger=logger,
            eval_every=eval_every,
            progress=not args.no_progress,
        )
        wall = time.perf_counter() - t0
        tracker = Tracker(args.optimizer, task, args.seed, logger)
        metrics = tracker.evaluate(out.params)
        for step, v in out.val_losses:
            tracker.observe(step, v)
        if out.status == "ok" and (not out.val_losses or out.val_losses[-1][0] != out.steps):
            tracker.observe(out.steps, metrics.val_loss)

        final = {
            "final/val_loss": metrics.val_loss,
            "final/test_loss": metrics.test_loss,
            "final/test_accuracy": (
                metrics.test_accuracy if metrics.test_accuracy is not None else float("nan")
            ),
        }
        logger.hparams(
            {
                "task": task.name,
                "optimizer": args.optimizer,
                "seed": args.seed,
                "steps": args.steps,
                **hparams,
            },
            final,
        )
        reason = None
        if out.status == "diverged":
            reason = f"non-finite training loss at step {out.diverged_step}"
        result = tracker.result(
            metrics,
            best_hparams=dict(hparams),
            grad_evals=out.grad_evals,
            wall_s=wall,
            status="diverged" if out.status == "diverged" else "ok",
            reason=reason,
            extra={
                "steps": out.steps,
                "diverged_step": out.diverged_step,
                "final_train_loss": out.losses[-1],
                "run_dir": str(run_dir.path),
            },
        )
        run_dir.write_results(result.to_dict())
        run_dir.save_checkpoint(
            {"params": {k: v.cpu() for k, v in out.params.items()}, "config": config}, "final.pt"
        )
    finally:
        logger.close()

    if out.status == "diverged":
        print(
            f"selfref: warning: training diverged at step {out.diverged_step} "
            f"(non-finite loss); results.json records status 'diverged'",
            file=sys.stderr,
        )
    acc = metrics.test_accuracy
    print(f"run: {run_dir.path}")
    print(
        f"final: val_loss={metrics.val_loss:.4f} test_loss={metrics.test_loss:.4f}"
        + (f" test_accuracy={acc:.4f}" if acc is not None else "")
        + f" steps={out.steps} status={out.status} wall={wall:.1f}s"
    )
    print(f"view: tensorboard --logdir {run_dir.path}")
    return 0
