"""``selfref meta-train --task fewshot-digits``: in-context meta-training of a sequence learner.

Not a sub-command of its own: ``selfref meta-train`` hands fewshot-digits runs to
:func:`run`, which meta-trains the sequence learner named by ``--core`` (srwm → the SRWM
model of Irie et al. 2022, lstm → an LSTM, hypernet → the HyperLSTM of Ha et al. 2016) by
backpropagation through the sequence (:func:`selfref.meta.incontext.meta_train_incontext`).

Options used: ``--meta-steps`` (training steps), ``--meta-lr`` (Adam lr), ``--lr-schedule``,
``--clip-grad-norm``, ``--eval-every`` (val evaluations; the weights kept are those with the
best val loss), ``--seed``, ``--logdir``, ``--device`` and the task options ``-o``
(``ways``, ``length``, ``proj_dim``, ``batch_size`` — sequences per step —,
``eval_sequences``, ``min_ways``, ``min_ways_steps``, ``projection``, and ``model_options``
entries as ``dim=64``, ``heads=2``, ``layers=2``, ``token_shift=true``, which go to the
learner). The truncation options of the learned-optimizer loop (``--unroll``, ``--inner-steps``,
``--meta-batch``, ``--second-order``, ``--warmup-steps``, ``--meta-loss``) do not apply here
and are ignored with a warning when changed from their defaults.

Writes ``<logdir>/meta-train/<stamp>-fewshot-digits-<core>-s<seed>/`` with TensorBoard
events, ``config.json``, ``argv.txt``, ``checkpoints/last.pt`` (the training state — weights,
Adam state, step, losses, best-so-far — every ``--checkpoint-every`` steps and at the end),
``checkpoints/best.pt`` (the weights returned: best val loss when ``--eval-every`` > 0, else
the last) and ``results.json`` (val/test loss, accuracy and acc@1/5/10/20).
``--resume RUN_DIR`` continues a run from its ``last.pt`` with the saved configuration; the
result equals the uninterrupted run's (the sequences depend only on step and seed).
"""

from __future__ import annotations

import argparse
import json
import warnings
from typing import Any

from selfref.commands.common import UsageError, parse_task_options

__all__ = ["run"]

_TASK_KEYS = (
    "ways",
    "length",
    "proj_dim",
    "batch_size",
    "eval_sequences",
    "split_seed",
    "min_ways",
    "min_ways_steps",
    "projection",
)
_IGNORED_DEFAULTS = {
    "unroll": 20,
    "inner_steps": 100,
    "meta_batch": 128,
    "second_order": False,
    "warmup_steps": 0,
    "meta_loss": "sum",
}


def run(args: argparse.Namespace) -> int:
    from selfref.logging import MultiLogger, PrintLogger, TensorBoardLogger
    from selfref.meta.incontext import CORE_TO_MODEL, InContextConfig, meta_train_incontext
    from selfref.runs import RunDir
    from selfref.tasks import make, resolve_device

    device = str(resolve_device(args.device))
    resume: dict[str, Any] | None = None
    if args.resume:
        run_dir = RunDir.open(args.resume)
        if not (run_dir.checkpoints / "last.pt").is_file():
            raise UsageError(f"--resume {args.resume!r}: no checkpoints/last.pt to resume from")
        saved = run_dir.read_config()
        if saved.get("task") != "fewshot-digits":
            raise UsageError(f"--resume {args.resume!r} is not a fewshot-digits run")
        core, seed = saved["core"], int(saved["seed"])
        task_opts, model_opts = saved["task_options"], saved["model_options"]
        cfg = InContextConfig(**saved["incontext"])
        checkpoint_every = int(saved["checkpoint_every"])
        resume = run_dir.load_checkpoint("last.pt", map_location=device)
    else:
        core, seed = args.core, args.seed
        if core not in CORE_TO_MODEL:
            raise UsageError(
                f"--core {core!r} has no in-context learner; valid: {', '.join(CORE_TO_MODEL)}"
            )
        changed = [k for k, v in _IGNORED_DEFAULTS.items() if getattr(args, k, v) != v]
        if changed:
            warnings.warn(
                f"options {changed} do not apply to fewshot-digits and are ignored", stacklevel=2
            )
        if args.clip_grad_norm < 0:
            raise UsageError(f"--clip-grad-norm must be >= 0, got {args.clip_grad_norm}")
        opts = parse_task_options(args.task_option)
        task_opts = {k: v for k, v in opts.items() if k in _TASK_KEYS}
        model_opts = {k: v for k, v in opts.items() if k not in _TASK_KEYS}
        cfg = InContextConfig(
            steps=args.meta_steps,
            lr=args.meta_lr,
            grad_clip=args.clip_grad_norm if args.clip_grad_norm > 0 else float("inf"),
            eval_every=args.eval_every,
            lr_schedule=args.lr_schedule,
            keep_best=args.eval_every > 0,
        )
        checkpoint_every = args.checkpoint_every
    task: Any = make(
        "fewshot-digits",
        model=CORE_TO_MODEL[core],
        model_options=model_opts,
        seed=seed,
        device=device,
        **task_opts,
    )
    task.model  # noqa: B018 - build the learner now so a bad option fails before the run dir
    if resume is None:
        run_dir = RunDir.create(args.logdir, "meta-train", f"fewshot-digits-{core}", seed)
        run_dir.write_config(
            {
                "task": "fewshot-digits",
                "task_options": task_opts,
                "core": core,
                "model": CORE_TO_MODEL[core],
                "model_options": model_opts,
                "incontext": cfg,
                "checkpoint_every": checkpoint_every,
                "seed": seed,
                "device": device,
            }
        )
    config = run_dir.read_config()

    def save(state: dict[str, Any]) -> None:
        run_dir.save_checkpoint({**state, "config": config})

    logger = MultiLogger(
        [TensorBoardLogger(run_dir.path), PrintLogger(every=max(1, cfg.steps // 20))]
    )
    try:
        res = meta_train_incontext(
            task,
            cfg,
            logger,
            seed=seed,
            checkpoint=save,
            checkpoint_every=checkpoint_every,
            resume=resume,
        )
        logger.hparams(
            {
                "core": core,
                "steps": cfg.steps,
                "lr": cfg.lr,
                "lr_schedule": cfg.lr_schedule,
                **{f"task/{k}": v for k, v in task_opts.items()},
                **{f"model/{k}": v for k, v in model_opts.items()},
            },
            {f"hparams/test_{k}": v for k, v in res.test.items()},
        )
    finally:
        logger.close()
    run_dir.save_checkpoint({"params": res.params, "config": config}, name="best.pt")
    out: dict[str, Any] = {"task": "fewshot-digits", "core": core, **res.to_dict()}
    out.pop("losses")
    out["final_meta_loss"] = res.losses[-1] if res.losses else None
    run_dir.write_results(out)
    print(json.dumps({"core": core, "val": res.val, "test": res.test}))
    print(f"run directory: {run_dir.path}")
    return 0
