"""``selfref meta-train``: every meta-training, through the one loop (:mod:`selfref.meta.trainer`).

A run is described by a *spec*: the task and its options, the core (learned optimizers) or
learner (``fewshot-digits``) and its options, the analyzer's and evaluation model's options,
and ``meta`` — a :class:`~selfref.meta.MetaTrainConfig`. The spec is built from, in order:
the defaults, ``--preset NAME`` (a TOML file shipped in ``selfref/presets/``), ``--config
FILE.toml`` (the same format), then the flags given on the command line. A spec file::

    task = "quadratic"          # any name of `selfref tasks`
    core = "lstm"               # learned optimizers: a core; fewshot-digits: srwm|lstm|hypernet
    [task_options]              # the task's constructor options
    [core_options]              # the core's (or, for fewshot-digits, the learner's) options
    [analyzer]                  # AnalyzerConfig fields
    [evaluation]                # EvaluationConfig fields
    [meta]                      # MetaTrainConfig fields, e.g. meta_steps = 1500
    estimator = "tbptt"
    [meta.estimator_options]

On ``fewshot-digits`` a sequence learner is trained by backpropagation through whole
sequences (``SequenceProblem``; defaults: ``full_bptt``, one sequence batch per step, val
evaluation every 500 steps); ``-o`` options that are not the task's go to the learner
(``dim=64``, ``heads=2``, ``token_shift=true``, ...).

Writes ``<logdir>/meta-train/<stamp>-<task>-<core>-s<seed>/`` with TensorBoard events,
``config.json`` (the spec), ``argv.txt``, ``checkpoints/last.pt`` (the training state) every
``checkpoint_every`` meta-steps, ``checkpoints/best.pt`` (the state at the best held-out
score) and ``results.json``. ``--resume RUN_DIR`` continues a run bit for bit with its spec.

Example:
    selfref meta-train --task quadratic --core lstm --meta-steps 500 --logdir logs
    selfref meta-train --preset l2l-quadratic-recipe
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import fields
from importlib import resources
from pathlib import Path
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

__all__ = ["add_parser", "run", "build_spec", "preset_names", "load_spec_file", "SPEC_KEYS"]

SPEC_KEYS = ("task", "core", "task_options", "core_options", "analyzer", "evaluation", "meta")

# Options of fewshot-digits itself; every other -o option goes to its learner.
_FEWSHOT_TASK_KEYS = (
    "ways",
    "length",
    "proj_dim",
    "batch_size",
    "eval_sequences",
    "split_seed",
    "min_ways",
    "min_ways_steps",
    "projection",
    "protocol",
)

# (flag dest, MetaTrainConfig field) for the flags that map onto the config one to one.
_META_FLAGS = (
    "meta_steps",
    "estimator",
    "unroll",
    "inner_steps",
    "meta_batch",
    "meta_lr",
    "lr_schedule",
    "warmup_steps",
    "min_lr_ratio",
    "meta_loss",
    "objective",
    "clip_grad_norm",
    "eval_every",
    "eval_tasks",
    "eval_steps",
    "checkpoint_every",
    "max_seconds",
    "seed",
)

# Baselines drawn beside a learned optimizer's held-out curve (fixed, untuned settings).
_CURVE_BASELINES = {
    "quadratic": {"sgd": ("sgd", {"lr": 0.01}), "adam": ("adam", {"lr": 0.1})},
    "default": {"sgd": ("sgd", {"lr": 0.1}), "adam": ("adam", {"lr": 0.01})},
}


def preset_names() -> list[str]:
    """Names of the presets shipped in ``selfref/presets/``."""
    root = resources.files("selfref") / "presets"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".toml"))


def _read_toml(text: str, where: str) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{where} is not valid TOML: {e}") from None
    bad = sorted(set(data) - set(SPEC_KEYS))
    if bad:
        raise UsageError(f"{where}: unknown key(s) {', '.join(bad)}; valid: {', '.join(SPEC_KEYS)}")
    for k in ("task_options", "core_options", "analyzer", "evaluation", "meta"):
        if k in data and not isinstance(data[k], dict):
            raise UsageError(f"{where}: [{k}] must be a table")
    return data


def load_spec_file(path: str | Path) -> dict[str, Any]:
    """A spec from a TOML file (``--config``)."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--config {str(p)!r} does not exist or is not a file")
    return _read_toml(p.read_text(), f"--config {str(p)!r}")


def _load_preset(name: str) -> dict[str, Any]:
    names = preset_names()
    if name not in names:
        raise UsageError(f"unknown preset {name!r}; valid: {', '.join(names)}")
    text = (resources.files("selfref") / "presets" / f"{name}.toml").read_text()
    return _read_toml(text, f"preset {name!r}")


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out.get(k, {}), v) if isinstance(v, dict) and k != "curriculum" else v
    return out


def add_parser(subparsers: Any) -> None:
    from selfref.meta.estimators import estimator_names
    from selfref.net.cores import core_names
    from selfref.tasks import names as task_names

    p = subparsers.add_parser(
        "meta-train",
        help="meta-train a modifier core or a sequence learner (the one meta-training loop)",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    src = p.add_argument_group("where the spec comes from (later ones override earlier ones)")
    src.add_argument("--preset", default=None, help="a shipped spec (see --list-presets)")
    src.add_argument("--config", default=None, metavar="FILE.toml", help="a spec file")
    src.add_argument("--list-presets", action="store_true", help="print the presets and exit")
    p.add_argument("--task", default=None, choices=task_names(), help="task (family)")
    p.add_argument(
        "--task-option",
        "-o",
        action="append",
        metavar="KEY=VALUE",
        help="task option, repeatable (fewshot-digits: non-task keys go to the learner)",
    )
    p.add_argument("--core", default=None, choices=core_names(), help="modifier core / learner")
    p.add_argument(
        "--core-option", action="append", metavar="KEY=VALUE", help="core option, repeatable"
    )
    p.add_argument("--estimator", default=None, choices=estimator_names())
    p.add_argument(
        "--estimator-option",
        "-e",
        action="append",
        metavar="KEY=VALUE",
        help="estimator option, repeatable (e.g. sigma=0.01)",
    )
    p.add_argument("--meta-steps", type=positive_int, default=None, help="meta-gradient updates")
    p.add_argument("--unroll", type=positive_int, default=None, help="steps per truncation")
    p.add_argument("--inner-steps", type=positive_int, default=None, help="inner horizon")
    p.add_argument("--meta-batch", type=positive_int, default=None, help="trajectories per step")
    p.add_argument("--meta-lr", type=positive_float, default=None, help="Adam lr on φ")
    p.add_argument("--lr-schedule", default=None, choices=["constant", "cosine"])
    p.add_argument("--warmup-steps", type=nonneg_int, default=None)
    p.add_argument("--min-lr-ratio", type=float, default=None, help="cosine floor / meta-lr")
    p.add_argument("--meta-loss", default=None, choices=["sum", "log_sum"])
    p.add_argument("--objective", default=None, choices=["train", "heldout"])
    p.add_argument("--clip-grad-norm", type=float, default=None, help="0 disables clipping")
    p.add_argument("--second-order", action="store_true", help="keep second derivatives")
    p.add_argument("--checkpoint-every", type=nonneg_int, default=None)
    p.add_argument("--eval-every", type=nonneg_int, default=None)
    p.add_argument("--eval-tasks", type=positive_int, default=None, help="held-out instances")
    p.add_argument("--eval-steps", type=nonneg_int, default=None, help="held-out horizon")
    p.add_argument("--max-seconds", type=float, default=None, help="stop after this long")
    p.add_argument("--resume", metavar="RUN_DIR", default=None, help="continue this run")
    p.add_argument("--seed", type=int, default=None)
    add_logdir_arg(p)
    add_device_arg(p)
    p.set_defaults(func=run)


def build_spec(args: argparse.Namespace) -> dict[str, Any]:
    """The run's spec from defaults, --preset, --config and the flags (validated later)."""
    spec: dict[str, Any] = {
        "task": "quadratic",
        "core": "lstm",
        "task_options": {},
        "core_options": {},
        "analyzer": {},
        "evaluation": {},
        "meta": {},
    }
    if args.preset:
        spec = _merge(spec, _load_preset(args.preset))
    if args.config:
        spec = _merge(spec, load_spec_file(args.config))
    if args.task is not None:
        spec["task"] = args.task
    if args.core is not None:
        spec["core"] = args.core
    spec["task_options"] = {**spec["task_options"], **parse_task_options(args.task_option)}
    spec["core_options"] = {**spec["core_options"], **parse_task_options(args.core_option)}
    if args.second_order:
        spec["evaluation"] = {**spec["evaluation"], "second_order": True}
    meta = dict(spec["meta"])
    for name in _META_FLAGS:
        v = getattr(args, name, None)
        if v is not None:
            meta[name] = v
    if args.estimator_option:
        meta["estimator_options"] = {
            **meta.get("estimator_options", {}),
            **parse_task_options(args.estimator_option),
        }
    spec["meta"] = meta
    if spec["task"] == "fewshot-digits":
        opts = spec["task_options"]
        spec["core_options"] = {
            **{k: v for k, v in opts.items() if k not in _FEWSHOT_TASK_KEYS},
            **spec["core_options"],
        }
        spec["task_options"] = {k: v for k, v in opts.items() if k in _FEWSHOT_TASK_KEYS}
    return spec


def _meta_config(spec: dict[str, Any], task: Any) -> Any:
    from selfref.meta import MetaTrainConfig

    meta = dict(spec["meta"])
    if spec["task"] == "fewshot-digits":  # one sequence batch per step, backprop through it
        defaults = {
            "estimator": "full_bptt",
            "meta_steps": 2000,
            "unroll": 1,
            "inner_steps": 1,
            "meta_batch": task.batch_size,
            "eval_every": 500,
            "log_every": 50,
        }
        meta = {**defaults, **meta}
    valid = {f.name for f in fields(MetaTrainConfig)}
    bad = sorted(set(meta) - valid)
    if bad:
        raise UsageError(
            f"unknown [meta] setting(s) {', '.join(bad)}; valid: {', '.join(sorted(valid))}"
        )
    return MetaTrainConfig.from_dict(meta)


def build(spec: dict[str, Any], device: str) -> tuple[Any, Any, Any]:
    """(task, problem, config) of a spec; every bad value raises ValueError naming it."""
    from selfref.meta import LearnedOptimizerProblem, SequenceProblem
    from selfref.net import AnalyzerConfig, EvaluationConfig, SelfReferentialNet
    from selfref.tasks import make

    for k in ("task_options", "core_options", "analyzer", "evaluation"):
        if not isinstance(spec.get(k, {}), dict):
            raise UsageError(f"spec {k} must be a table of options, got {spec.get(k)!r}")
    task: Any = make(spec["task"], device=device, **spec["task_options"])
    if spec["task"] == "fewshot-digits":
        from selfref.net.sequence import CORE_TO_MODEL, make_sequence_model

        if spec["core"] not in CORE_TO_MODEL:
            raise UsageError(
                f"--core {spec['core']!r} has no in-context learner; valid: "
                f"{', '.join(CORE_TO_MODEL)}"
            )
        model = make_sequence_model(spec["core"], task.input_dim, task.ways, **spec["core_options"])
        task = task.with_model(model)
        cfg = _meta_config(spec, task)
        options = {
            "task_options": spec["task_options"],
            "learner": spec["core"],
            "learner_options": spec["core_options"],
        }
        return task, SequenceProblem(task, options), cfg
    cfg = _meta_config(spec, task)
    try:
        an = AnalyzerConfig(**spec["analyzer"])
        ev = EvaluationConfig(**spec["evaluation"])
    except TypeError as e:
        raise UsageError(f"bad analyzer/evaluation option: {e}") from None
    net = SelfReferentialNet.from_task(
        task, core=spec["core"], analyzer=an, evaluation=ev, **spec["core_options"]
    )
    problem = LearnedOptimizerProblem(
        net,
        meta_loss=cfg.meta_loss,
        objective=cfg.objective,
        mode=cfg.mode,
        eval_tasks=cfg.eval_tasks,
        eval_steps=cfg.eval_steps or cfg.inner_steps,
        eval_split=cfg.eval_split,
    )
    return task, problem, cfg


def _resume_spec(path: str) -> tuple[Any, dict[str, Any]]:
    from selfref.runs import RunDir

    run_dir = RunDir.open(path)
    cfg_file = run_dir.path / "config.json"
    if not cfg_file.is_file():
        raise UsageError(f"--resume {path!r} has no config.json; is it a meta-train run directory?")
    try:
        saved = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise UsageError(f"--resume {path!r}: config.json is not valid JSON ({e})") from None
    if not isinstance(saved, dict) or saved.get("command") != "meta-train" or "spec" not in saved:
        raise UsageError(
            f"--resume {path!r} is not a meta-train run directory (its config.json was not "
            "written by selfref meta-train)"
        )
    if not (run_dir.checkpoints / "last.pt").is_file():
        raise UsageError(f"--resume {path!r}: no checkpoints/last.pt to resume from")
    return run_dir, saved["spec"]


def run(args: argparse.Namespace) -> int:
    from selfref.logging import MultiLogger, PrintLogger, TensorBoardLogger
    from selfref.meta import MetaTrainer
    from selfref.runs import RunDir
    from selfref.tasks import resolve_device

    if args.list_presets:
        for name in preset_names():
            print(name)
        return 0
    device = str(resolve_device(args.device))
    if args.resume:
        names = (*_META_FLAGS, "task", "core", "preset", "config")
        given = [n for n in names if getattr(args, n, None) is not None]
        if given or args.task_option or args.core_option or args.estimator_option:
            raise UsageError(
                "--resume continues a run with its stored spec; drop "
                + ", ".join(f"--{n.replace('_', '-')}" for n in given or ["options"])
            )
        run_dir, spec = _resume_spec(args.resume)
        task, problem, cfg = build(spec, device)
        ck = run_dir.load_checkpoint("last.pt")  # safe load; a bad file fails before work
    else:
        spec = build_spec(args)
        task, problem, cfg = build(spec, device)  # everything validated before the run dir
        ck = None
        run_dir = RunDir.create(
            args.logdir, "meta-train", f"{spec['task']}-{spec['core']}", cfg.seed, argv=args.argv
        )
        run_dir.write_config({"command": "meta-train", "spec": spec, "device": device})
    tb = TensorBoardLogger(run_dir.path)
    logger = MultiLogger(
        [tb, PrintLogger(every=max(1, cfg.meta_steps // 20), prefixes=("meta/loss", "heldout/"))]
    )
    baselines = None
    if spec["task"] != "fewshot-digits":
        baselines = _CURVE_BASELINES.get(spec["task"], _CURVE_BASELINES["default"])
    trainer = MetaTrainer(problem, cfg, logger, run_dir=run_dir, baselines=baselines)
    if ck is not None:
        trainer.load_state_dict(ck)
    try:
        res = trainer.train()
        final = problem.evaluate(res.best_meta_params)
        test = None
        if spec["task"] == "fewshot-digits":
            test = task.evaluate(res.best_meta_params, "test")
            logger.hparams(
                {"core": spec["core"], "meta_steps": cfg.meta_steps, "meta_lr": cfg.meta_lr,
                 "lr_schedule": cfg.lr_schedule,
                 **{f"task/{k}": v for k, v in spec["task_options"].items()},
                 **{f"model/{k}": v for k, v in spec["core_options"].items()}},
                {f"hparams/test_{k}": v for k, v in test.items()},
            )  # fmt: skip
    finally:
        logger.close()
    out: dict[str, Any] = {
        "task": spec["task"],
        "core": spec["core"],
        "estimator": cfg.estimator,
        "meta_steps": cfg.meta_steps,
        "steps_done": res.steps_done,
        "best_step": res.best_step,
        "best_heldout_score": res.best_score if math.isfinite(res.best_score) else None,
        "heldout": final,
        "skipped": res.skipped,
        "meta_train_grad_evals": res.meta_train_grad_evals,
        "wall_s": res.wall_s,
        "history": res.history,
        "best_checkpoint": str(run_dir.checkpoints / "best.pt"),
    }
    if test is not None:
        out["test"] = test
    run_dir.write_results(out)
    print(json.dumps({k: v for k, v in out.items() if k != "history"}, default=str))
    print(f"run directory: {run_dir.path}")
    return 0
